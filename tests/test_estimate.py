"""The cost estimate (``--estimate``, ``methods.cost``, ``benchmarks.estimate``).

The counts a method declares in ``cost_plan`` are checked against what its code does:
every method fits and scores its ``tiny`` profile while a global forward hook counts the
samples through each stage's module (in train mode: training; in eval mode during fit:
validation and encoding; in scoring: evaluations per slice).
"""

from __future__ import annotations

import io
import time
from collections import defaultdict
from contextlib import redirect_stdout

import pytest
import torch
from torch import nn

from benchmarks.estimate import (
    GPU_PEAK_TFLOPS,
    count_flops,
    detect_gpu,
    hours,
    plan_jobs,
    published_sizes,
    DataSizes,
)
from benchmarks.execute import paired_split
from benchmarks.jobs import Variant, build_jobs
from methods.registry import get_method_class, list_methods
from tests.conftest import make_tiny_slices

N_TRAIN, N_VAL, N_TEST = 10, 3, 2  # 10 / batch 4 or 8 leaves short batches: the plans must count them


class SampleCounter:
    """Samples through every module, split by phase and train/eval mode (a global forward hook)."""

    def __init__(self) -> None:
        self.phase = "fit"
        self.counts: dict[tuple[int, str, bool], int] = defaultdict(int)
        self._alive: list[nn.Module] = []  # keeps ids unique while counting

    def __enter__(self) -> "SampleCounter":
        def hook(module, args, kwargs, output):
            first = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
            if first is not None:
                key = (id(module), self.phase, module.training)
                if key not in self.counts:
                    self._alive.append(module)
                self.counts[key] += int(first.shape[0])

        self._handle = torch.nn.modules.module.register_module_forward_hook(hook, with_kwargs=True)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()

    def samples(self, module: nn.Module, phase: str, training: bool) -> int:
        return self.counts.get((id(module), phase, training), 0)


def _module(method, path: str) -> nn.Module:
    top, _, rest = path.partition(".")
    network = method.networks()[top]
    return network.get_submodule(rest) if rest else network


def _fit_and_score(name: str, **overrides):
    cls = get_method_class(name)
    method = cls.from_profile("tiny", device="cpu", seed=0, score_batch_size=3, **overrides)
    modalities = method.training_modalities("FLAIR")
    data = make_tiny_slices(n_train=N_TRAIN, n_val=N_VAL, n_test=N_TEST, size=32, channels=1 if modalities == ["FLAIR"] else 4)
    if modalities == ["FLAIR"]:
        train, val, test = data.split("train"), data.split("val"), data.split("test")
    else:
        train, val = paired_split(data, modalities, "train"), paired_split(data, modalities, "val")
        test = data.modality("FLAIR").split("test")
    with SampleCounter() as counter:
        method.fit(train, val)
        counter.phase = "score"
        method.score(test.images, test.brain_masks)
    return method, counter



def builtin_methods() -> list[str]:
    """The suite's own methods (plugins that other test modules register are not planned here)."""
    return [name for name in list_methods() if get_method_class(name).__module__.startswith("methods.")]


CASES = [(name, {}) for name in builtin_methods()] + [
    ("madad", {"map_reference": "vae_reconstruction", "ddim_steps": 1}),  # a second decode per slice
    ("autoddpm", {"resample_steps": 3}),
    ("thor", {"t_start": 6, "t_harmonization": (5, 2, 1)}),
    ("pddpm", {"patch_size": 16}),  # 16 at 16 px: one patch
    ("madad", {"checkpoint": "best_val_mse", "val_every": 1}),  # validation passes in fit
    # dry runs cut every reverse chain (validation's too): the plan counts the cut chains
    ("ddpm", {"max_reverse_steps": 2}),
    ("autoddpm", {"max_reverse_steps": 2, "resample_steps": 2}),
    ("thor", {"max_reverse_steps": 2}),
]


@pytest.mark.parametrize("name,overrides", CASES, ids=[f"{n}-{'-'.join(o) or 'default'}" for n, o in CASES])
def test_plan_counts_equal_the_forward_calls_of_fit_and_score(name: str, overrides: dict) -> None:
    method, counter = _fit_and_score(name, **overrides)
    plan = method.cost_plan(N_TRAIN, N_VAL)
    assert plan is not None, f"{name} declares no cost_plan"
    if not plan.stages:
        assert method.networks() == {}, f"{name} has networks but its plan has no stage"
        return
    for stage in plan.stages:
        module = _module(method, stage.module)
        # evaluations per scored slice
        declared = [e for e in plan.score if e.stage == stage.name]
        measured = counter.samples(module, "score", False) / N_TEST
        if any(e.bound is not None for e in declared):  # data-dependent (IterMask2's refinement)
            assert 0 < measured <= sum(e.bound for e in declared), (name, stage.name, measured)
            if name == "itermask2":
                assert measured == method.iterations_.mean(), "net1 passes = the recorded refinement iterations"
        else:
            assert measured == sum(e.count for e in declared), f"{name} {stage.name}: {measured} evaluations per slice, plan says {declared}"
        # training (train mode) and the forward-only passes of fit (eval mode)
        trained = sum(p.samples for p in plan.train if p.stage == stage.name)
        assert counter.samples(module, "fit", True) == trained, f"{name} {stage.name}: training samples"
        forward = sum(e.count for e in plan.fit_forward if e.stage == stage.name)
        assert counter.samples(module, "fit", False) == forward, f"{name} {stage.name}: forward passes in fit"


def test_flop_counter_matches_a_hand_count_on_meta_and_cpu() -> None:
    net = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 10))
    conv = 2 * (4 * 8 * 8) * (2 * 3 * 3)  # 2 FLOPs per multiply-add: outputs x (C_in x k x k)
    linear = 2 * (4 * 8 * 8) * 10
    assert count_flops(lambda: net(torch.zeros(1, 2, 8, 8))) == conv + linear
    assert count_flops(lambda: net(torch.zeros(3, 2, 8, 8))) == 3 * (conv + linear)
    meta = net.to("meta")
    assert count_flops(lambda: meta(torch.zeros(1, 2, 8, 8, device="meta"))) == conv + linear


def test_meta_flops_equal_cpu_flops_of_a_built_method() -> None:
    from benchmarks.estimate import built_method

    meta = built_method("cyclunet", "tiny", {}, (1, 32, 32), device="meta")
    cpu = built_method("cyclunet", "tiny", {}, (1, 32, 32), device="cpu")
    assert next(meta.forward_net.parameters()).is_meta and next(cpu.forward_net.parameters()).device.type == "cpu"
    flops = {s.name: count_flops(s.probe) for s in meta.cost_plan(1, 1).stages}
    assert flops == {s.name: count_flops(s.probe) for s in cpu.cost_plan(1, 1).stages}
    assert flops["forward"] > 0


def _sizes(modalities=("T1",)) -> dict[str, DataSizes]:
    size = DataSizes("toy", 100, 10, 20, (128, 128), tuple(modalities), "test")
    return {m: size for m in modalities}


def test_shared_checkpoints_are_trained_once_per_training_key() -> None:
    variants = {"ddpm": [Variant(), Variant("lr=0.001", (("lr", "0.001"),))], "thor": [Variant(), Variant("t_start=50", (("t_start", "50"),))]}
    jobs = build_jobs("S1", ["ddpm", "thor"], "x", "toy", ["T1"], [0, 1], "quick", variants)
    costs, unknown, device = plan_jobs(jobs, _sizes(), needs_val_maps=False, n_examples=0)
    assert not unknown and device == "meta"
    trains = {(c.method, c.variant, c.seed): c.trains for c in costs}
    # DDPM trains per seed; THOR (same family and training config) and its inference variant reuse it;
    # a changed learning rate is another network
    assert trains == {
        ("ddpm", "default", 0): True, ("ddpm", "default", 1): True,
        ("ddpm", "lr=0.001", 0): True, ("ddpm", "lr=0.001", 1): True,
        ("thor", "default", 0): False, ("thor", "default", 1): False,
        ("thor", "t_start=50", 0): False, ("thor", "t_start=50", 1): False,
    }
    thor = next(c for c in costs if c.method == "thor" and c.variant == "t_start=50")
    assert thor.train == 0 and thor.trained_by == "ddpm"
    assert thor.plan.score[0].count == 51  # t_start 50 -> 51 evaluations
    ddpm = next(c for c in costs if c.method == "ddpm" and c.variant == "default")
    unet = ddpm.flops["unet"]
    assert ddpm.train == 3 * unet * sum(p.samples for p in ddpm.plan.train)
    assert ddpm.score == 20 * 35 * unet  # 20 test slices x (t_start 34 + 1)


def test_published_sizes_come_from_the_split_file() -> None:
    s2 = published_sizes("S2")
    assert (s2.n_train, s2.n_val, s2.n_test) == (990 * 20, 128 * 20, 133)
    assert s2.modalities == ("T1", "T1CE", "T2", "FLAIR")
    s1 = published_sizes("S1")
    assert (s1.n_train, s1.n_val, s1.n_test, s1.modalities) == (523, 58, 655, ("T1",))


def test_gpu_names_and_hours() -> None:
    assert detect_gpu("NVIDIA H100 80GB HBM3") == "h100"
    assert detect_gpu("NVIDIA H100 PCIe") == "h100-pcie"
    assert detect_gpu("NVIDIA H200") == "h200"
    assert detect_gpu("NVIDIA A100-SXM4-80GB") == "a100"
    assert detect_gpu("NVIDIA L40S") == "l40s" and detect_gpu("NVIDIA L4") == "l4"
    assert detect_gpu("NVIDIA A10G") is None and detect_gpu("Tesla V100-SXM2-16GB") is None
    assert hours(GPU_PEAK_TFLOPS["h100"] * 1e12 * 0.5 * 3600, GPU_PEAK_TFLOPS["h100"], 0.5) == pytest.approx(1.0)


@pytest.mark.slow  # ~10 s of CPU: every paper network built on the meta device and its FLOPs counted
def test_estimate_prints_the_s2_paper_table_quickly() -> None:
    from benchmarks.run import main

    out = io.StringIO()
    start = time.process_time()  # this process's CPU time: a busy machine does not fail the test
    with redirect_stdout(out):
        assert main(["--protocol", "S2", "--methods", "all", "--profile", "paper", "--data", "published", "--estimate", "--gpu", "h200"]) == 0
    seconds = time.process_time() - start
    text = out.getvalue()
    for name in builtin_methods():
        assert f"\n{name:>9s} " in text or f"\n {name:>9s}" in text or f" {name} " in text, name
    assert f"{4 * len(list_methods())} job(s)" in text and "device-hours" in text and "by autoddpm" in text  # DDPM/THOR reuse AutoDDPM's training
    assert "989.5 TFLOP/s" in text
    assert seconds < 20, f"--estimate took {seconds:.1f} s of CPU"


def test_estimate_rejects_bad_arguments(capsys) -> None:
    from benchmarks.run import main

    with pytest.raises(SystemExit):
        main(["--protocol", "S2", "--methods", "ae", "--estimate", "--gpu", "abacus"])
    assert "--gpu abacus: unknown" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--protocol", "S2", "--methods", "ae", "--estimate", "--mfu", "1.5"])
    assert "--mfu 1.5" in capsys.readouterr().err


def test_jobs_whose_training_modalities_are_missing_are_left_out_and_named() -> None:
    jobs = build_jobs("S1", ["cyclunet", "ae"], "x", "toy", ["T1"], [0], "tiny", {})
    costs, left_out, _ = plan_jobs(jobs, _sizes(), needs_val_maps=True, n_examples=4)
    assert [c.method for c in costs] == ["ae"]
    assert left_out == ["cyclunet (T1): needs T2, which the data lack"]
    ae = costs[0]
    assert ae.scored_slices == 20 + 10 + 4  # test + validation (scored by the protocol) + examples


def test_cached_flop_counts_tell_input_sizes_apart() -> None:
    from benchmarks.estimate import built_method, stage_flop_counts

    small = built_method("ddpm", "tiny", {}, (1, 32, 32))  # internal 16 x 16
    large = built_method("ddpm", "tiny", {"image_size": 32}, (1, 32, 32))
    flops_small = stage_flop_counts(small, small.cost_plan(1, 1))["unet"]
    flops_large = stage_flop_counts(large, large.cost_plan(1, 1))["unet"]
    assert flops_large > 3 * flops_small  # 4x the pixels (attention grows faster)
    assert flops_small == count_flops(small.cost_plan(1, 1).stages[0].probe)


def test_estimate_counts_the_slices_of_the_chosen_data() -> None:
    from benchmarks.estimate import data_sizes
    from benchmarks.execute import load_data
    from benchmarks.run import main
    from protocols import get_protocol

    sizes = data_sizes(get_protocol("S2"), "embedded")
    flair = load_data("embedded").modality("FLAIR")
    assert sizes["FLAIR"].n_train == len(flair.split("train")) and sizes["FLAIR"].n_val == len(flair.split("val"))
    out = io.StringIO()
    with redirect_stdout(out):
        assert main(["--protocol", "S2", "--methods", "ae", "--modalities", "FLAIR", "--profile", "tiny", "--estimate"]) == 0
    text = out.getvalue()
    assert f"train {sizes['FLAIR'].n_train:,} / val {sizes['FLAIR'].n_val:,} / test {sizes['FLAIR'].n_test:,}" in text
    assert "1 job(s)" in text and "(FLAIR)" in text
