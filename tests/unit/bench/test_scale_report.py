"""msmoe report's report (bench/scale_report.py) from hand-made points."""

import os

from bench.scale_report import write_scale_report
from tests.helpers import scale_record


def test_report_from_hand_made_points(tmp_path):
    recs = [scale_record("strong", 1, 1, 4, 100.0), scale_record("strong", 2, 1, 4, 160.0),
            scale_record("strong", 2, 2, 4, 150.0, dispatch=3.0, combine=3.0, fwd_bytes=1e6, calls=8)]
    path = write_scale_report(recs, str(tmp_path))
    text = open(path).read()
    assert "a MODEL, not a measurement" in text and "| strong | 2 | - | 2 | 4 |" in text
    for png in ("throughput.png", "breakdown.png", "a2a_volume.png", "memory.png", "expert_load.png",
                "efficiency.png", "projection_model.png"):
        assert os.path.getsize(tmp_path / png) > 1000, png
