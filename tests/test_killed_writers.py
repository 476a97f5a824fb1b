"""`b2b grow` and `b2b vocab transfer` killed with SIGKILL at seeded random moments of their
run (imports, reading, growing, the write): the output directory is the previous one, intact, or
absent, never half-written; the hidden siblings the killed writers left are removed by the next
run, which succeeds."""

import pytest

import harness

GROW = ["grow", "minilm", "--to", "layers=8,hidden=384,heads=12,ffn=1536", "--depth", "stack"]
KILLS = 4


@pytest.mark.parametrize("previous", [False, True], ids=["new", "overwrite"])
def test_a_killed_grow_leaves_the_previous_output_or_none(previous, tmp_path):
    harness.killed_writer(GROW, tmp_path / "work" / "grown", seed=20 + previous, kills=KILLS, previous=previous,
                          rerun=["--overwrite"])


def test_a_killed_vocabulary_transfer_leaves_no_output_and_a_rerun_succeeds(tmp_path):
    tokenizer = tmp_path / "tok"
    harness.b2b_process("tokenizer", "--kind", "bpe", "--vocab-size", 512, "--out", tokenizer)
    harness.killed_writer(["vocab", "transfer", "minilm", "--to-tokenizer", tokenizer],
                          tmp_path / "work" / "transferred", seed=22, kills=KILLS)


def test_an_existing_output_is_exchanged_for_the_new_one_in_one_step(tmp_path):
    from growth.adapters.files import atomic_directory, exchange
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    (a / "x").write_text("a"), (b / "y").write_text("b")
    assert exchange(a, b)  # Linux's renameat2(RENAME_EXCHANGE) on this filesystem
    assert [p.name for p in a.iterdir()] == ["y"] and [p.name for p in b.iterdir()] == ["x"]
    with atomic_directory(b) as tmp:
        (tmp / "z").write_text("new")
    assert [p.name for p in b.iterdir()] == ["z"] and sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]
