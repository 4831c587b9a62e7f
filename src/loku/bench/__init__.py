"""Benchmarks built from the library's phases: planting a forget set into a model
(:mod:`loku.bench.planting`), the TDEC data slices every benchmark shares (:mod:`loku.bench.data`)
and the paper's Table 1 against the never-trained model (:mod:`loku.bench.tdec`); BENCHES below is the
table of `loku bench` commands."""

from __future__ import annotations

from typing import NamedTuple


class Bench(NamedTuple):
    module: str  # has add_arguments(parser) and run(args) -> exit code
    help: str
    report: str | None = None  # has render_markdown(summary): results.md from results.json (`loku bench report`)


# `loku bench NAME`: a new bench is one entry here (the CLI reads this table) and its module.
BENCHES: dict[str, Bench] = {
    "tdec": Bench("loku.bench.tdec", "plant each TDEC split, unlearn it with every method, compare with the "
                                     "original model", "loku.bench.summary"),
    "tofu": Bench("loku.bench.tofu", "fine-tune target and reference on TOFU, unlearn with every method and rank "
                                     "(Figure 5)", "loku.bench.tofu_report"),
    "continual": Bench("loku.bench.continual", "plant 4 request sets, unlearn them one after another with each "
                                               "variant (strategy, gate)", "loku.bench.continual_report"),
    "reveal": Bench("loku.bench.reveal", "plant TDEC text, unlearn it from what the model reveals given only "
                                         "prefixes, against the real text (upper bound) and random text (lower bound)",
                   "loku.bench.reveal_report"),
    "report": Bench("loku.bench.rereport", "rewrite results.md (and the verdicts against the targets) of bench "
                                           "folders from their results.json alone"),
}
