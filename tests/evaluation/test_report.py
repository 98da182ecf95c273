"""The evaluation JSON contract round-trips through EvalReport.from_dict (the demo plots saved reports)."""

from __future__ import annotations

import math

from recursify.evaluation.exits import LoopMetrics, OracleExits
from recursify.evaluation.multiple_choice import TaskResult
from recursify.evaluation.perplexity import PerplexityResult
from recursify.evaluation.report import EvalReport


def test_from_dict_inverts_to_dict() -> None:
    per_loop = [LoopMetrics(1, 40.0, 0.5, 1.2, 0.4), LoopMetrics(2, 21.5, 1.0, 0.3, 0.7)]
    ppl = PerplexityResult(21.5, math.log(21.5) * 99, 99, 64, 32, per_loop, OracleExits([60, 39], 1.39))
    params = {"embedding": 10, "non_embedding": 20, "lora": 5, "total": 35, "source_total": 50, "ratio": 0.7}
    report = EvalReport("run", params, loops=2, ppl=ppl, tasks={"t": TaskResult(0.5, 0.25, 8, 1)})
    rebuilt = EvalReport.from_dict(report.to_dict())
    assert rebuilt.to_dict() == report.to_dict()
    assert rebuilt.loops == 2 and rebuilt.ppl is not None and math.isclose(rebuilt.ppl.nll, ppl.nll)
    plain = EvalReport.from_dict({"model": "m", "params": params})
    assert plain.loops == 1 and plain.ppl is None and plain.tasks == {}
