"""msmoe report's report (scaling/report.py) from hand-made points."""

import os

from scaling.projection import ProjectionSpec
from scaling.projection_report import validation_summary
from scaling.report import write_scale_report
from tests.helpers import scale_record, validation_sweep_records


def test_report_from_hand_made_points(tmp_path):
    recs = [scale_record("strong", 1, 1, 4, 100.0), scale_record("strong", 2, 1, 4, 160.0),
            scale_record("strong", 2, 2, 4, 150.0, dispatch=3.0, combine=3.0, fwd_bytes=1e6, calls=8)]
    path = write_scale_report(recs, str(tmp_path))
    text = open(path).read()
    assert "a MODEL, not a measurement" in text and "| strong | 2 | - | 2 | 4 |" in text
    # the default presets side by side, the loopback fit labelled as such, every source named
    for name in ("h100-ndr", "a100-hdr", "eth-100g"):
        assert f"| {name} | 8 |" in text and f"{name}: efficiency" in text
    assert "| **measured** (this machine's loopback, fitted) | one level |" in text and "NVLink 4" in text
    assert "### Layout per node count (MODEL)" in text and "Break-even points (MODEL)" in text
    assert "No validation: no point with EP >= 2 and at most 1 ranks to fit on" in text
    for png in ("throughput.png", "breakdown.png", "a2a_volume.png", "memory.png", "expert_load.png",
                "efficiency.png", "projection_model.png", "layout_model.png"):
        assert os.path.getsize(tmp_path / png) > 1000, png


def test_report_projects_only_the_presets_asked_for_and_validates_on_held_out_points(tmp_path):
    recs = validation_sweep_records(0.040)
    text = open(write_scale_report(recs, str(tmp_path), projection=ProjectionSpec(presets=("h100-ndr",),
                                                                                   fit_max_world=2))).read()
    assert "| h100-ndr | 8 |" in text and "a100-hdr" not in text and "loopback, fitted" not in text
    val = text[text.index("## Validation"):]
    assert "`s w2 ep2 E4`, `w w2 ep2 E4` (all-to-all)" in val
    assert "| s w4 ep4 E4 | " in val and "| s w4 ep1 E4 |" in val  # the held-out point and its compute twin
    # 40 ms measured forward all-to-all; the hand prediction of tests/unit/scaling/test_projection.py
    assert "| 40.00 |" in val and "w4" not in val.split("Predicted:")[0]
    lines = validation_summary(recs, 2)
    assert lines[0] == "validation: model fitted on s w2 ep2 E4, w w2 ep2 E4 (<= 2 ranks); held out:"
    assert lines[1].split()[:4] == ["s", "w4", "ep4", "E4"] and "40.00 measured" in lines[1]
    assert validation_summary(recs[:3], None)[0].startswith("validation: none (no point with EP >= 2 and at most 1")
