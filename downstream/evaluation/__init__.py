"""The encoder evaluation suite: frozen-encoder protocols side by side, with bootstrap intervals.

`fm3d eval-encoders --config conf/eval/<suite>.yaml --encoders A B C` (and
`evaluate_encoders(...)` behind it) runs every protocol of the suite for every encoder on the same
studies and writes one table. See docs/evaluation.md.
"""
