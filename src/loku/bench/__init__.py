"""Benchmarks built from the library's phases: planting a forget set into a model
(:mod:`loku.bench.planting`), the TDEC data slices every benchmark shares (:mod:`loku.bench.data`)
and the paper's Table 1 against the never-trained model (:mod:`loku.bench.tdec`)."""
