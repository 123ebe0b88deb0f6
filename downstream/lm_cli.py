"""`fm3d causal-lm`: write a tiny from-scratch causal language model learned from report text (offline).

    fm3d causal-lm --out demo/causal_lm --texts demo/manifest.parquet --columns findings impression

The language model of `conf/downstream/report_generation.yaml` when no pretrained one can be
downloaded (the demo, air-gapped clusters, tests): `init_causal_lm` learns a byte-level BPE
vocabulary from the reports and initialises a small GPT-2 (or LLaMA) at random. The options
are those of `fm3d text-model` (`fm3d.text_cli`), plus `--family`.
"""

from __future__ import annotations

from pathlib import Path

from downstream.language.causal_lm import init_causal_lm
from fm3d.text_cli import model_parser, write_model

FAMILIES = ("gpt2", "llama")


def main(argv: list[str] | None = None) -> int:
    """Entry point of `fm3d causal-lm`."""
    # 512 positions: report generation feeds the image tokens, the prompt and a whole report.
    parser = model_parser("fm3d causal-lm", __doc__, max_length=512)
    parser.add_argument("--family", choices=FAMILIES, default="gpt2", help="architecture (default gpt2)")
    args = parser.parse_args(argv)

    def write(out: Path, texts: list[str], **sizes: int) -> Path:
        return init_causal_lm(out, texts, family=args.family, **sizes)

    hint = (
        "language_model: {out} in conf/downstream/report_generation.yaml, "
        "or transformers.AutoModelForCausalLM.from_pretrained('{out}')"
    )
    return write_model("fm3d causal-lm", args, write, hint)
