"""The built-in encoder families, one module each.

The registry imports every module here on first use (`fm3d.models.registry.discover_families`),
so a new family is a new file that calls `register_family` and `@register_encoder`; see
docs/encoders.md, "Adding a family".
"""
