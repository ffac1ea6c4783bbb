"""A worker's user error left for msmoe's launcher (launcher/worker_errors.py): written only under it,
read back once per distinct message, with the ranks that said it."""

from launcher import worker_errors


def test_a_worker_leaves_its_message_only_under_msmoes_launch(tmp_path, monkeypatch):
    monkeypatch.delenv(worker_errors.ENV, raising=False)
    monkeypatch.setenv("RANK", "1")
    assert worker_errors.report("x") is False  # a plain torchrun: the worker prints it itself
    monkeypatch.setenv(worker_errors.ENV, str(tmp_path))
    assert worker_errors.report("train.p=30 is too many") is True
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rank1.txt"]
    monkeypatch.setenv(worker_errors.ENV, str(tmp_path / "gone"))
    assert worker_errors.report("x") is False  # cannot be left there: printed instead, never lost


def test_each_distinct_message_is_said_once_naming_ranks_other_than_0(tmp_path):
    for rank, text in ((0, "same"), (1, "same"), (2, "only mine"), (3, "only mine"), (5, "odd")):
        (tmp_path / f"rank{rank}.txt").write_text(text)
    (tmp_path / "rank4.txt.tmp").write_text("half written")
    got = worker_errors.collected(str(tmp_path))
    assert got == {"same": [0, 1], "only mine": [2, 3], "odd": [5]}
    assert worker_errors.format_messages(got) == [
        "msmoe: error: same", "[ranks 2, 3] msmoe: error: only mine", "[rank 5] msmoe: error: odd"]
    assert worker_errors.collected(str(tmp_path / "none")) == {} and worker_errors.collected(None) == {}
