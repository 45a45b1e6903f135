"""bench/ still runs end to end (tiny sizes, short bursts). Speed is not asserted here:
bench/ measures it, these machines are too noisy for timed tests."""

from __future__ import annotations

import json

from click.testing import CliRunner

from bench.__main__ import main
from bench.contenders import CONTENDERS


def test_bench_measures_every_contender(kernel, tmp_path):
    result = CliRunner().invoke(main, ["--sizes", "1,10", "--seconds", "0.05",
                                       "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    (report,) = tmp_path.glob("throughput-*.json")
    data = json.loads(report.read_text())
    assert set(data["results"]) == set(CONTENDERS)
    for name, rows in data["results"].items():
        assert all(rows[n]["mpps"] > 0 for n in ("1", "10")), name
    assert data["results"]["bpfilter XDP"]["10"]["ns_per_packet"] > 0
