"""The planner as one command: a plan is chosen only when it fits with its margin, the fastest
that does; both modes print one table; every argument is checked before any work."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest

from setr_lowmem.commands import benchmark as bench
from setr_lowmem.commands import plan as plan_cmd
from setr_lowmem.config import load_config
from setr_lowmem.sizing import planner
from setr_lowmem.sizing.cards import CARDS, DRIVER_SHARE
from setr_lowmem.sizing.forecast import OVERHEADS, Forecast
from setr_lowmem.sizing.measure import benchmark_overrides
from setr_lowmem.sizing.planner import Plan, Target, budget_target, card_target
from setr_lowmem.sizing.speed import Efficiencies, OpCounts, SpeedModel, StepCounts
from tests.helpers import ROOT


def _forecast(allocated: float, megabytes_per_image: float) -> Forecast:
    """A forecast of `allocated` GiB whose step moves `megabytes_per_image` per image (its speed)."""
    ops = OpCounts()
    ops.add("none", 0, megabytes_per_image * 1e6 * 16)
    return Forecast("stub", 16, allocated, {}, 0.0, counts=StepCounts(ops, OpCounts(), 1, 16))


MODEL = SpeedModel(Efficiencies(compute=0.5, memory=0.5, kernel_us=5.0, host_gbs=10.0, param_us=100.0),
                   errors=[-0.1, 0.2], fitted_on="stub")
FAST, SLOW = Plan.of(16, {"memory.checkpointing": "none"}), Plan.of(16, {"memory.checkpointing": "full"})
# needs at the worst measured reserve ratio: fast 12 GiB, slow 10 (at the expected ratio: 9.3 and 8.0)
CANDIDATES = [(FAST, _forecast((12 - OVERHEADS.context) / OVERHEADS.reserved_high, 100)),
              (SLOW, _forecast((10 - OVERHEADS.context) / OVERHEADS.reserved_high, 200))]


def test_a_plan_is_chosen_only_when_it_fits_with_the_margin():
    need = {plan: f.device(True) for plan, f in CANDIDATES}
    assert need[FAST] == pytest.approx(12) and CANDIDATES[0][1].device() < 9.5  # 'likely' on a 10.5 GiB card
    card = Target("card", 10.5, CARDS["rtx4090"])
    chosen = planner._choose(card, CANDIDATES, MODEL)
    assert chosen.plan == SLOW and chosen.fits  # 'likely' never wins over a plan that fits
    roomy = planner._choose(Target("card", 12.5, CARDS["rtx4090"]), CANDIDATES, MODEL)
    assert roomy.plan == FAST and roomy.img_s > chosen.img_s  # the fastest, by predicted speed
    low, high = roomy.low, roomy.high
    assert (low, high) == pytest.approx((roomy.img_s / 1.2, roomy.img_s / 0.9))
    tight = planner._choose(Target("card", 9.5, CARDS["rtx4090"]), CANDIDATES, MODEL)
    assert tight.plan == FAST and not tight.fits  # only 'likely': reported, not chosen
    lines = planner.summary(load_config("pup_ade20k"), [(Target("a tight card", 9.5), tight)], "setr-train")
    assert "no plan fits with the margin; 'likely' (not chosen)" in lines[1] and "paste" not in "\n".join(lines)
    assert planner._choose(Target("card", 7.0, CARDS["rtx4090"]), CANDIDATES, MODEL) is None  # not even likely


def test_cards_are_given_in_gb_and_converted_visibly():
    t = card_target(24, CARDS["rtx4090"])
    assert t.capacity == pytest.approx(24 * DRIVER_SHARE) and "24 GB sold = 24 GiB of memory" in t.how
    assert card_target(12).label == "a 12 GB card" and card_target(12).card is None
    assert budget_target(10).capacity == 10 and planner.gib(0.0123) == "0.012" and planner.gib(1.234) == "1.23"


def test_predict_prints_one_row_per_card_with_speed_days_and_the_line_to_paste():
    cfg = load_config("pup_ade20k", benchmark_overrides([], False) + ["train.micro_batch=2", "train.total_batch=4"])
    lines: list[str] = []
    targets = [card_target(24, CARDS["rtx4090"]), card_target(12)]
    rows = planner.predict(cfg, targets, micro_batches=[2, 1], report=lines.append, paste="setr-train --cfg x")
    assert [t for t, _ in rows] == targets
    named, sized = (out for _, out in rows)
    assert named.fits and named.img_s > 0 and named.low < named.img_s < named.high
    assert sized.fits and math.isnan(sized.img_s)  # a size alone has no throughput figures
    table = lines[lines.index("") + 1:]
    assert table[1].startswith("  GeForce RTX 4090 (24 GB)") and f"{named.img_s:.1f}" in table[1]
    days = cfg.schedule.iters * cfg.train.total_batch / named.img_s / 86400
    assert f"{days:.1f} (" in table[1]
    assert table[2].startswith("      paste: setr-train --cfg x train.micro_batch=")
    assert "24 GB sold = 24 GiB of memory" in "\n".join(lines)


@pytest.mark.parametrize("argv,says", [
    (["--predict", "--cards", "0"], "--cards: '0' is neither a card"),
    (["--predict", "--cards", "-8"], "--cards: '-8' is neither a card"),
    (["--predict", "--cards", "nan"], "--cards: 'nan' is neither a card"),
    (["--predict", "--cards", "4090"], "did you mean rtx4090?"),
    (["--predict", "--micro-batches", "0"], "--micro-batches: '0' is not a whole number above 0"),
    (["--predict", "--micro-batches", "3"], "--micro-batches 3: each must divide train.total_batch=16"),
    (["--predict", "--budget-gib", "-1"], "--budget-gib: '-1' is not a memory size in GiB above 0"),
    (["--predict", "--budget-gib", "nan"], "--budget-gib: 'nan' is not a memory size in GiB above 0"),
    (["--predict", "--steps", "2"], "--steps is for --measure"),
    (["--measure", "--cards", "l4"], "--cards is for --predict"),
    ([], "one of the arguments --predict --measure is required"),
])
def test_the_planner_refuses_a_bad_argument_in_one_line_before_any_work(argv, says, monkeypatch, capsys):
    monkeypatch.setattr(planner, "predict", lambda *a, **k: pytest.fail("predicted despite a bad argument"))
    monkeypatch.setattr(planner, "measure_plans", lambda *a, **k: pytest.fail("measured despite a bad argument"))
    monkeypatch.setattr(sys, "argv", ["launch/plan.py", "--cfg", "pup_ade20k", *argv])
    with pytest.raises(SystemExit) as ended:
        plan_cmd.main()
    out, err = capsys.readouterr()
    assert ended.value.code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("error: ") and says in err, err


def test_help_names_the_command_that_was_run():
    assert plan_cmd.command_names("/usr/bin/setr-plan") == ("setr-plan", "setr-train")
    assert plan_cmd.command_names("launch/plan.py") == ("python launch/plan.py", "python launch/train.py")
    assert plan_cmd.command_names(str(ROOT / "setr_lowmem/commands/plan.py"))[0] == "python -m setr_lowmem.commands.plan"
    out = subprocess.run([sys.executable, "-m", "setr_lowmem.commands.plan", "--help"], cwd=ROOT, text=True,
                         capture_output=True, timeout=120).stdout
    assert out.startswith("usage: python -m setr_lowmem.commands.plan") and "--predict" in out and "--measure" in out


def test_the_benchmark_refuses_an_unknown_row_before_running_any(monkeypatch, capsys):
    monkeypatch.setattr(bench, "measure", lambda *a, **k: pytest.fail("a row ran before the refusal"))
    monkeypatch.setattr(sys, "argv", ["benchmarks/memory.py", "--rows", "naive", "bf16", "full"])
    with pytest.raises(SystemExit) as ended:
        bench.main()
    err = capsys.readouterr().err
    assert ended.value.code == 2 and err.startswith("error: --rows: unknown row 'full'; rows: naive, bf16")


def test_the_loader_rate_gives_the_cores_a_speed_needs(tmp_path):
    """`benchmarks/loader.py`'s per-core rate for the config's dataset and crop (the newest file wins)
    turns a card's images/s into the DataLoader workers that keep up with it."""
    import json

    from setr_lowmem.config import load_config
    from setr_lowmem.sizing.planner import cores, loader_rate

    def write(name: str, rate: float) -> None:
        rows = [{"config": "pup_ade20k", "dataset": "ade20k", "crop": 512, "img_s_per_core": rate},
                {"config": "pup_cityscapes", "dataset": "cityscapes", "crop": 768, "img_s_per_core": 4.0}]
        (tmp_path / name).write_text(json.dumps({"cpu": "x86_64", "rows": rows}))

    write("loader_x86_64_2026-11-30.json", 10.0)
    write("loader_x86_64_2026-12-01.json", 20.0)
    ade = load_config("pup_ade20k")
    rate = loader_rate(ade, where=(tmp_path,))
    assert rate is not None and rate[0] == 20.0 and "2026-12-01" in rate[1]
    assert cores(81.0, rate) == "5" and cores(float("nan"), rate) == "-" and cores(81.0, None) == "-"
    assert loader_rate(load_config("pup_pascal_context"), where=(tmp_path,)) is None  # not measured
    assert loader_rate(load_config("pup_cityscapes"), where=(tmp_path,))[0] == 4.0


def test_the_loader_benchmark_writes_the_rate_the_planner_reads(tmp_path):
    import json
    import sys

    from setr_lowmem.config import load_config
    from setr_lowmem.sizing.planner import loader_rate
    from tests.helpers import run

    run([sys.executable, "benchmarks/loader.py", "--cfg", "pup_pascal_context", "--images", "2", "--out", str(tmp_path)])
    [written] = tmp_path.glob("loader_*.json")
    [row] = json.loads(written.read_text())["rows"]
    assert (row["dataset"], row["crop"], row["image"], row["images"]) == ("pascal_context", 480, "500x375.jpg", 2)
    assert row["img_s_per_core"] > 0
    assert loader_rate(load_config("pup_pascal_context"), where=(tmp_path,))[0] == row["img_s_per_core"]
