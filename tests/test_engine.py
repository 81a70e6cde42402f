"""The shared training engine: device and dtype choice, clipping, gradient checkpointing, mixed
precision, the Python API (finetune.run, sweep.run), DPO and resume on 2 processes, one-line errors."""

import json
import math
from dataclasses import fields

import pytest
import torch
from conftest import stop_at_check, tiny, two_processes

from lmlab import devices, engine, peft
from lmlab.cli import build_parser, main
from lmlab.errors import LmlabError
from lmlab.finetune import FinetuneConfig

# --- device and dtype selection -------------------------------------------------------------------


def test_auto_device_and_dtype_on_this_cpu_machine():
    assert devices.select_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert devices.select_dtype("auto", torch.device("cpu")) == torch.float32
    assert devices.select_dtype("fp16", torch.device("cpu"), warn_slow=False) == torch.float16
    assert devices.mixed_precision(torch.bfloat16) == "bf16" and devices.mixed_precision(torch.float32) == "no"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error a machine without CUDA gives")
@pytest.mark.parametrize("name", ["cuda", "cuda:1"])
def test_missing_cuda_is_one_clear_error(name):
    with pytest.raises(LmlabError, match="no CUDA device"):
        devices.select_device(name)


def test_unknown_device_and_dtype_are_errors():
    with pytest.raises(LmlabError, match="device must be one of"):
        devices.select_device("tpu")
    with pytest.raises(LmlabError, match="dtype must be one of"):
        devices.select_dtype("int4", torch.device("cpu"))


def test_bf16_on_cpu_is_allowed_with_a_warning(capsys):
    assert devices.select_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    err = capsys.readouterr().err
    assert err.startswith("lmlab: warning:") and "slower" in err and err.count("\n") == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error a machine without CUDA gives")
def test_quantisation_needs_cuda_and_bitsandbytes():
    with pytest.raises(LmlabError, match="--load-in-4bit needs (bitsandbytes|a CUDA device)"):
        devices.quantization_config(4, torch.device("cpu"), torch.bfloat16)


def test_rng_state_round_trip_covers_the_cpu_generator():
    torch.manual_seed(3)
    state = devices.rng_state()
    a = torch.rand(4)
    devices.set_rng_state(state)
    assert torch.equal(a, torch.rand(4))
    devices.set_rng_state(state["cpu"])  # an older checkpoint's bare CPU state
    assert torch.equal(a, torch.rand(4))


@pytest.mark.parametrize("kind, stage, expected", [
    ("FSDP", None, True), ("DEEPSPEED", 3, True), ("DEEPSPEED", 2, False), ("DEEPSPEED", 1, False),
    ("MULTI_GPU", None, False), ("MULTI_CPU", None, False), ("NO", None, False),
])
def test_only_fsdp_and_zero3_shard_the_forward(kind, stage, expected):
    """Validation goes through the wrapper on every process (whole set each) only where the
    parameters are sharded between forwards; ZeRO-1/2 split it across processes as DDP does."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from lmlab import checkpoint

    accelerator = SimpleNamespace(distributed_type=DistributedType[kind],
                                  state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(zero_stage=stage)))
    assert checkpoint.sharded_forward(accelerator) is expected


def test_rng_state_round_trip_covers_the_mps_generator(monkeypatch):
    """On a Mac the MPS generator (dropout masks drawn there) is saved and restored too; the MPS
    calls are stood in for here, where there is no MPS."""
    held = {"state": torch.tensor([1, 2, 3], dtype=torch.uint8)}
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    monkeypatch.setattr(torch.mps, "get_rng_state", lambda: held["state"].clone())
    monkeypatch.setattr(torch.mps, "set_rng_state", lambda s: held.update(state=s))
    state = devices.rng_state()
    assert torch.equal(state["mps"], torch.tensor([1, 2, 3], dtype=torch.uint8))
    held["state"] = torch.tensor([9], dtype=torch.uint8)  # drawing moves the generator on
    devices.set_rng_state(state)
    assert torch.equal(held["state"], torch.tensor([1, 2, 3], dtype=torch.uint8))


# --- the command line ------------------------------------------------------------------------------


def finetune_args(model_dir, data_dir, out, *extra):
    return ["finetune", "--model", model_dir, "--dataset", data_dir, "--out-dir", str(out), "--max-iters", "2",
            "--eval-interval", "2", "--batch-size", "8", "--rank", "4", "--alpha", "8", "--no-progress", *extra]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the errors a machine without CUDA gives")
@pytest.mark.parametrize("extra, message", [
    (["--device", "cuda"], "--device cuda: this machine has no CUDA device"),
    (["--load-in-4bit", "--device", "cpu"], "--load-in-4bit needs"),
    (["--load-in-8bit", "--method", "full", "--device", "cpu"], "--load-in-8bit"),
])
def test_device_errors_are_one_line_and_leave_no_run(extra, message, tiny_model_dir, toy_dataset, tmp_path, capsys):
    assert main(finetune_args(tiny_model_dir, toy_dataset, tmp_path / "run", *extra)) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("lmlab: error:") and err.count("\n") == 1
    assert not (tmp_path / "run" / "last").exists()


def test_finetune_config_has_the_command_lines_names_and_defaults():
    args = build_parser().parse_args(["finetune"])
    for f in fields(FinetuneConfig):
        assert getattr(args, f.name) == f.default, f.name
    with pytest.raises(LmlabError, match="unknown finetune option 'rnak'"):
        FinetuneConfig.from_options({"rnak": 4})


# --- the Python API ---------------------------------------------------------------------------------


def test_finetune_run_from_python_lowers_the_loss_on_a_learnable_task(tiny_model_dir, toy_dataset, tmp_path):
    from lmlab import finetune

    config = FinetuneConfig(model=tiny_model_dir, dataset=toy_dataset, out_dir=str(tmp_path / "run"), method="full",
                            lr=1e-2, max_iters=24, eval_interval=12, batch_size=8, no_progress=True, json=True,
                            device="cpu")
    result = finetune.run(config)
    rows = engine.read_metrics(tmp_path / "run")
    assert result["steps"] == 24 and [r["step"] for r in rows if r["val_loss"] is not None] == [12, 24]
    # a random model starts near log(49152) = 10.8; after 24 steps it has learnt the two label words
    assert rows[0]["train_loss"] > 5 and result["last_val_loss"] < 1.0, (rows[0]["train_loss"], result)
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["train"]["device"] == "cpu" and run["train"]["max_grad_norm"] == 1.0
    assert run["options"]["method"] == "full"


def test_sweep_run_from_python_checks_every_run_before_training(tiny_model_dir, toy_dataset, tmp_path):
    from lmlab import sweep

    runs = sweep.expand([{"method": "lora", "rank": 4}, {"method": "bitfit", "lr": "x", "bogus": 1}],
                        {"model": tiny_model_dir, "dataset": toy_dataset, "max_iters": 1, "no_progress": True})
    with pytest.raises(LmlabError, match="unknown finetune option 'bogus'"):
        sweep.run(runs, tmp_path / "sweep", accuracy_limit=4, device="cpu")
    runs = sweep.expand([{"method": "lora", "rank": 4}, {"method": "adapter", "lr": "x"}],
                        {"model": tiny_model_dir, "dataset": toy_dataset, "max_iters": 1, "no_progress": True})
    with pytest.raises(LmlabError, match="finetune option lr: expected float, got 'x'"):
        sweep.run(runs, tmp_path / "sweep", accuracy_limit=4, device="cpu")
    assert not list((tmp_path / "sweep").glob("lora-r4-*")), "nothing trained before the grid was checked"
    runs = sweep.expand([{"method": "lora", "rank": 4}, {"method": "adapter", "bottleneck": 8}],
                        {"model": tiny_model_dir, "dataset": toy_dataset, "max_iters": 2, "eval_interval": 1,
                         "no_progress": True, "json": True})
    rows = sweep.run(runs, tmp_path / "sweep", accuracy_limit=4, device="cpu")
    assert rows[0]["run"].startswith("lora-r4-") and rows[1]["run"].startswith("adapter-m8-")
    assert all(r["eval_best"]["n"] == 4 for r in rows)
    assert (tmp_path / "sweep" / "results.md").exists() and (tmp_path / "sweep" / "val_loss.png").exists()


# --- what the engine does in a step -----------------------------------------------------------------


def test_gradients_are_clipped_to_max_grad_norm(tiny_model_dir, toy_dataset, tmp_path, monkeypatch):
    """The global norm the optimizer sees is at most --max-grad-norm (and is not clipped without it)."""
    norms = []
    real_step = torch.optim.AdamW.step

    def step(self, *a, **k):
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        norms.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    assert main(finetune_args(tiny_model_dir, toy_dataset, tmp_path / "a", "--max-grad-norm", "1e-3")) == 0
    assert len(norms) == 2 and all(n <= 1e-3 * (1 + 1e-5) for n in norms)
    norms.clear()
    assert main(finetune_args(tiny_model_dir, toy_dataset, tmp_path / "b", "--max-grad-norm", "0")) == 0
    assert all(n > 1e-3 for n in norms), norms


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
@pytest.mark.parametrize("method", ["lora", "full"])
def test_gradient_checkpointing_gives_the_same_gradients(name, method):
    """Recomputing activations in the backward pass changes memory, not the gradients (LoRA dropout
    included: checkpointing replays the random state)."""
    grads = []
    for checkpointing in (False, True):
        model = tiny(name)
        if method == "lora":
            peft.apply(model, peft.make_config("lora", r=4, alpha=8.0, dropout=0.1))
        model.train()
        if checkpointing:
            engine.enable_gradient_checkpointing(model)
            assert model.is_activation_checkpointing
        torch.manual_seed(0)
        ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(1))
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-4, atol=1e-6)


def test_finetune_with_gradient_checkpointing_runs(tiny_model_dir, toy_dataset, tmp_path):
    assert main(finetune_args(tiny_model_dir, toy_dataset, tmp_path / "gc", "--gradient-checkpointing")) == 0
    assert (tmp_path / "gc" / "best" / "adapter_model.safetensors").exists()


def test_the_base_is_stored_in_the_compute_dtype_only_where_that_is_safe():
    from lmlab.finetune import storage_dtype

    cuda, cpu, bf16, fp32 = torch.device("cuda", 0), torch.device("cpu"), torch.bfloat16, torch.float32
    assert storage_dtype("lora", cuda, bf16) == bf16  # a frozen base in bf16 on a GPU: half the memory
    assert storage_dtype("adapter", cuda, torch.float16) == torch.float16
    assert storage_dtype("full", cuda, bf16) == fp32  # fp32 master weights
    assert storage_dtype("lora", cuda, bf16, fsdp=True) == fp32  # FSDP flattens one dtype per unit
    assert storage_dtype("lora", cpu, bf16) == fp32  # the CPU's autocast does not cover a bf16 base


@pytest.mark.parametrize("model_name, method", [("tiny-llama", "lora"), ("tiny-llama", "adapter"),
                                                ("tiny-gpt2", "bitfit"), ("tiny-llama", "full")])
def test_bf16_mixed_precision_on_the_cpu(model_name, method, tiny_model_dir, toy_dataset, tmp_path):
    """--dtype bf16 on the CPU: fp32 weights, the forward under bf16 autocast (accelerate), every
    trainable parameter fp32, a finite loss, for every method."""
    from lmlab import finetune
    from lmlab.finetune import load_for_training, method_config

    model_dir = tiny_model_dir
    if model_name == "tiny-gpt2":
        from transformers import AutoTokenizer

        model_dir = str(tmp_path / "gpt2")
        tiny("tiny-gpt2").save_pretrained(model_dir)
        AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(model_dir)
    config = FinetuneConfig(model=model_dir, dataset=toy_dataset, out_dir=str(tmp_path / method), method=method,
                            rank=4, alpha=8.0, max_iters=2, eval_interval=2, no_progress=True, json=True,
                            device="cpu", dtype="bf16")
    model, _ = load_for_training(config.model, method_config(config), config.train_config())
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    result = finetune.run(config)
    assert result["steps"] == 2 and result["best_val_loss"] == result["best_val_loss"]  # not NaN
    run = json.loads((tmp_path / method / "run.json").read_text())
    assert run["train"]["dtype"] == "bf16"


def test_fp16_training_on_the_cpu_is_one_line(tiny_model_dir, toy_dataset, tmp_path, capsys):
    assert main(finetune_args(tiny_model_dir, toy_dataset, tmp_path / "r", "--device", "cpu", "--dtype", "fp16")) == 2
    err = capsys.readouterr().err
    assert "fp16 trains on a GPU only" in err and err.strip().count("\n") == 0


def test_prefix_mlp_with_gradient_checkpointing_is_refused(tiny_model_dir, toy_dataset, tmp_path, capsys):
    argv = finetune_args(tiny_model_dir, toy_dataset, tmp_path / "r", "--method", "prefix", "--prefix-hidden", "16",
                         "--gradient-checkpointing")
    assert main(argv) == 2 and "--prefix-hidden" in capsys.readouterr().err
    assert main(finetune_args(tiny_model_dir, toy_dataset, tmp_path / "p", "--method", "prefix",
                              "--gradient-checkpointing")) == 0  # plain prefixes are fine


def test_lora_on_a_bf16_base_merges_in_the_base_dtype():
    """Mixed precision: fp32 LoRA weights beside a bf16 base; eval() merges into bf16 (the
    forward without autocast needs one dtype) and train() restores W0 exactly."""
    model = tiny("tiny-llama").to(torch.bfloat16)
    peft.apply(model, peft.make_config("lora", r=4, alpha=8.0))
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    layer = next(m for m in model.modules() if type(m).__name__ == "LoraLayer")
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    w0 = layer.base_layer.weight.detach().clone()
    ids = torch.randint(0, 1000, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        unmerged = model(input_ids=ids).logits
    model.eval()
    assert layer.base_layer.weight.dtype == torch.bfloat16
    with torch.no_grad():
        merged = model(input_ids=ids).logits
    torch.testing.assert_close(merged.float(), unmerged.float(), atol=0.1, rtol=0.05)  # bf16 rounding
    model.train()
    assert torch.equal(layer.base_layer.weight, w0)


# --- several processes ----------------------------------------------------------------------------


def test_dpo_on_two_processes(tiny_model_dir, tmp_path):
    """DPO runs on the shared engine, so several processes work for it: one writer, same files."""
    rows = [{"prompt": f"Review: a film about thing {i}.\nSentiment:", "chosen": " positive", "rejected": " negative"}
            for i in range(24)]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "ddp"
    done = two_processes("-m", "lmlab.cli", "dpo", "--model", tiny_model_dir, "--data", str(data), "--out-dir",
                         str(out), "--max-iters", "2", "--eval-interval", "2", "--batch-size", "4", "--rank", "4",
                         "--no-progress", "--json")
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((out / "run.json").read_text())["processes"] == 2
    assert (out / "last" / "adapter_model.safetensors").exists() and (out / "best").is_dir()
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]  # one writer, not one per process


DRIVER = '''
import sys
from contextlib import contextmanager

from lmlab import checkpoint, engine
from lmlab.cli import main

stop_at, sharded, argv = int(sys.argv[1]), sys.argv[2] == "1", sys.argv[3:]
if sharded:  # exercise the per-process optimizer files and the whole-set validation through the
    checkpoint.sharded = lambda accelerator: True  # wrapper that FSDP / ZeRO-3 runs do (DDP underneath)
    checkpoint.sharded_forward = lambda accelerator: True


class Stop:
    checks = 0

    def is_set(self):
        self.checks += 1
        return self.checks == stop_at


@contextmanager
def stop_requests():
    yield Stop()


if stop_at:
    engine._stop_requests = stop_requests
sys.exit(main(argv))
'''


@pytest.mark.parametrize("sharded", [False, True])
def test_two_process_resume_equals_an_uninterrupted_run(sharded, tiny_model_dir, toy_dataset, tmp_path):
    """2-process DDP with LoRA dropout: stop after step 2 of 4 (as Ctrl-C), resume, and end bit for
    bit where the uninterrupted run ends: every process gets its own generator (and, as under FSDP,
    its own optimizer file) back."""
    from lmlab.io import load_tensors

    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)

    def launch(out, stop_at, *extra):
        return two_processes(str(driver), str(stop_at), "1" if sharded else "0",
                             *finetune_args(tiny_model_dir, toy_dataset, out, "--max-iters", "4", "--lora-dropout",
                                            "0.1", "--batch-size", "4", "--json"), *extra)

    assert launch(tmp_path / "whole", 0).returncode == 0
    assert json.loads((tmp_path / "whole" / "run.json").read_text())["processes"] == 2
    stopped = launch(tmp_path / "stopped", 2)
    assert stopped.returncode != 0 and "stopped at step 2 of 4" in stopped.stderr, stopped.stderr[-2000:]
    files = {p.name for p in (tmp_path / "stopped" / "last").iterdir()}
    assert ({"optimizer.rank0.pt", "optimizer.rank1.pt"} <= files) if sharded else ("optimizer.pt" in files)
    resumed = launch(tmp_path / "stopped", 0, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a = load_tensors(tmp_path / "whole" / "last" / "trainable.safetensors")
    b = load_tensors(tmp_path / "stopped" / "last" / "trainable.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


SHARE_DRIVER = """
import json, os, sys

from lmlab import dpo, train
from lmlab.cli import main


def recording(real):
    def evaluate(self, model, device, indices):
        ours = real(self, model, device, indices)
        whole = real(self, model, device, list(range(self.val_size)))  # the same weights, in one process
        row = {"indices": indices, "whole": {k: float(s) / max(float(c), 1) for k, (s, c) in whole.items()}}
        with open(sys.argv[1] + ".rank" + os.environ["RANK"], "a") as f:
            f.write(json.dumps(row) + "\\n")
        return ours
    return evaluate


train.LabelTask.evaluate = recording(train.LabelTask.evaluate)
dpo.DpoTask.evaluate = recording(dpo.DpoTask.evaluate)
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.parametrize("trainer", ["finetune", "dpo"])
def test_two_processes_split_the_validation_set_and_add_up_its_metrics(trainer, tiny_model_dir, toy_dataset,
                                                                       tmp_path):
    """Under DDP each process scores every second held-out item, not the whole set again, and the
    logged validation metrics are the whole set's: equal to scoring it in one process."""
    driver = tmp_path / "driver.py"
    driver.write_text(SHARE_DRIVER)
    out = tmp_path / "run"
    if trainer == "dpo":
        rows = [{"prompt": f"Review: a film about thing {i}.\nSentiment:", "chosen": " positive",
                 "rejected": " negative"} for i in range(30)]
        data = tmp_path / "pairs.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        argv = ["dpo", "--model", tiny_model_dir, "--data", str(data), "--out-dir", str(out), "--max-iters", "2",
                "--eval-interval", "2", "--batch-size", "4", "--rank", "4", "--no-progress", "--json"]
    else:
        argv = finetune_args(tiny_model_dir, toy_dataset, out, "--json")
    done = two_processes(str(driver), str(tmp_path / "shares"), *argv)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((out / "run.json").read_text())["processes"] == 2
    shares = [json.loads((tmp_path / f"shares.rank{r}").read_text().splitlines()[-1]) for r in (0, 1)]
    size = len(shares[0]["indices"]) + len(shares[1]["indices"])
    assert size > 2 and sorted(shares[0]["indices"] + shares[1]["indices"]) == list(range(size))
    assert abs(len(shares[0]["indices"]) - len(shares[1]["indices"])) <= 1
    logged = engine.read_metrics(out)[-1]
    whole = shares[0]["whole"]
    assert whole.keys() == {k[4:] for k in logged if k.startswith("val_") and logged[k] is not None}
    for name, value in whole.items():
        assert logged[f"val_{name}"] == pytest.approx(value, rel=1e-5, abs=1e-6), name


FSDP2_DRIVER = """
import json, sys

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from lmlab import peft
from lmlab.data import Encoded
from lmlab.io import save_tensors
from lmlab.models import build_model, preset_config
from lmlab.train import LabelTask

dist.init_process_group("gloo")
rank, out = dist.get_rank(), sys.argv[1]
torch.manual_seed(0)
model = build_model(preset_config("tiny-llama"))
config = peft.make_config("lora", r=4, alpha=8.0)
peft.apply(model, config)
with torch.no_grad():
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.normal_(std=0.1)  # an adapter that changes the output
items = [Encoded(list(range(5 + i, 12 + 2 * i)), [20 + i], 0) for i in range(6)]
task = LabelTask(items, items, pad_id=0, eval_batch_size=4)
cpu, every = torch.device("cpu"), list(range(len(items)))
total, count = task.evaluate(model, cpu, every)["loss"]
alone = float(total / count)
trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
mesh = init_device_mesh("cpu", (2,))
for layer in model.model.layers:
    fully_shard(layer, mesh=mesh)
fully_shard(model, mesh=mesh)
total, count = task.evaluate(model, cpu, every)["loss"]  # eval() on DTensor weights
full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
if rank == 0:
    save_tensors(out + "/trainable.safetensors", trainable)
    peft.save(model, config, out + "/adapter", state_dict=full)
    json.dump({"alone": alone, "sharded": float(total / count),
               "type": type(model.model.layers[0].self_attn.q_proj.base_layer.weight).__name__},
              open(out + "/result.json", "w"))
dist.destroy_process_group()
"""


def test_lora_under_torch_fsdp2_on_two_cpu_processes(tmp_path):
    """FSDP2 (``fully_shard``) runs on the CPU with gloo, though accelerate's FSDP does not: a LoRA
    model sharded over 2 processes scores its validation set as the whole model does in one
    process (LoRA's eval() must not merge into the DTensor shards: it did, and the loss was wrong),
    and the gathered full state dict saves an adapter equal to the trained weights."""
    from lmlab.io import load_tensors
    from lmlab.models import build_model, preset_config

    driver = tmp_path / "driver.py"
    driver.write_text(FSDP2_DRIVER)
    done = two_processes(str(driver), str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["type"] == "DTensor"
    assert result["sharded"] == pytest.approx(result["alone"], rel=1e-5)
    model = build_model(preset_config("tiny-llama"))
    peft.load(model, tmp_path / "adapter")
    saved = {n: p for n, p in model.named_parameters() if "lora_" in n}
    trained = load_tensors(tmp_path / "trainable.safetensors")
    assert saved.keys() == trained.keys() and all(torch.equal(saved[n], trained[n]) for n in saved)


def test_dpo_reports_to_tensorboard(tiny_model_dir, tmp_path):
    """DPO logs through accelerate's trackers as fine-tuning does (it had none before the engine);
    tensorboard comes with the test extras."""
    rows = [{"prompt": f"Review: film {i}.\nSentiment:", "chosen": " positive", "rejected": " negative"}
            for i in range(12)]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["dpo", "--model", tiny_model_dir, "--data", str(data), "--out-dir", str(tmp_path / "tb"),
                 "--max-iters", "2", "--eval-interval", "2", "--batch-size", "4", "--rank", "4", "--no-progress",
                 "--report-to", "tensorboard", "--json"]) == 0
    assert list((tmp_path / "tb").rglob("events.out.tfevents.*"))


def test_a_failing_sweep_run_leaves_the_table_of_those_that_finished(tiny_model_dir, toy_dataset, tmp_path):
    from lmlab import sweep

    runs = sweep.expand([{"method": "lora", "rank": 4}, {"method": "adapter", "dataset": str(tmp_path / "nowhere")}],
                        {"model": tiny_model_dir, "dataset": toy_dataset, "max_iters": 1, "no_progress": True,
                         "json": True})
    with pytest.raises(LmlabError, match="no such folder"):
        sweep.run(runs, tmp_path / "sweep", accuracy_limit=4, device="cpu")
    table = (tmp_path / "sweep" / "results.md").read_text()
    assert "lora-r4" in table and "adapter" not in table


# --- resume continues the recorded run ---------------------------------------------------------------


def test_resume_takes_the_recorded_settings_and_refuses_a_conflicting_one(tiny_model_dir, toy_dataset, tmp_path,
                                                                         capsys):
    out = tmp_path / "run"
    assert main(finetune_args(tiny_model_dir, toy_dataset, out, "--lr", "1e-3")) == 0
    # resumed with neither --dataset nor --lr nor --rank: the recorded ones, not the defaults
    assert main(["finetune", "--model", tiny_model_dir, "--out-dir", str(out), "--resume", "--max-iters", "4",
                 "--no-progress"]) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["dataset"] == toy_dataset and run["options"]["lr"] == 1e-3 and run["options"]["rank"] == 4
    assert run["options"]["max_iters"] == 4 and run["total_steps"] == 4
    capsys.readouterr()
    assert main(["finetune", "--model", tiny_model_dir, "--out-dir", str(out), "--resume", "--max-iters", "6",
                 "--rank", "8", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lmlab: error: --resume continues the run") and "--rank 8 differs from its 4" in err
    assert err.count("\n") == 1


def test_lengthening_a_run_does_not_redraw_its_learning_rate(tiny_model_dir, toy_dataset, tmp_path, monkeypatch):
    """Stopped at step 3 of 6, resumed with --max-iters 12: the rates already applied stay, the next
    one continues from where the old schedule was (no jump), and the new end reaches the same floor."""
    out = tmp_path / "run"
    args = ("--lr", "1e-3", "--eval-interval", "1")
    monkeypatch.setattr(engine, "_stop_requests", stop_at_check(3))
    assert main(finetune_args(tiny_model_dir, toy_dataset, out, *args, "--max-iters", "6")) == 130
    monkeypatch.undo()
    before = [r["lr"] for r in engine.read_metrics(out)]
    assert len(before) == 3
    assert main(finetune_args(tiny_model_dir, toy_dataset, out, *args, "--max-iters", "12", "--resume")) == 0
    lrs = [r["lr"] for r in engine.read_metrics(out)]
    assert lrs[:3] == before and len(lrs) == 12
    assert lrs[3] == pytest.approx(engine.lr_at(3, 6, 0, 1e-3))  # what the old schedule had next: no jump
    assert all(b <= a + 1e-12 for a, b in zip(lrs, lrs[1:])), lrs
    floor = 1e-4
    assert lrs[-1] == pytest.approx(floor + (lrs[3] - floor) * 0.5 * (1 + math.cos(math.pi * 8 / 9)))
    schedule = json.loads((out / "last" / "trainer_state.json").read_text())["schedule"]
    assert schedule == [{"from": 0, "total": 6}, {"from": 3, "total": 12, "lr": lrs[3]}]
    with pytest.raises(LmlabError, match="has done 12 steps"):
        engine.lengthened([{"from": 0, "total": 12}], 12, 8, 0.05, 1e-3)


def test_gradient_accumulation_steps_once_per_grad_accum_micro_batches(tiny_model_dir, toy_dataset, tmp_path,
                                                                       monkeypatch):
    """--grad-accum 3 through accelerate.accumulate: one optimizer step per 3 training micro-batches."""
    from lmlab import train

    steps, losses = [], []
    real_step, real_loss = torch.optim.AdamW.step, train.label_loss

    def step(self, *a, **k):
        steps.append(1)
        return real_step(self, *a, **k)

    def label_loss(*a, **k):
        out = real_loss(*a, **k)
        losses.append(out[0])
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    monkeypatch.setattr(train, "label_loss", label_loss)
    assert main(finetune_args(tiny_model_dir, toy_dataset, tmp_path / "r", "--grad-accum", "3", "--batch-size", "4",
                              "--eval-interval", "100")) == 0
    assert len(steps) == 2  # --max-iters 2 optimizer steps
    training = [loss for loss in losses if loss.requires_grad]
    assert len(training) == 6  # 2 x 3 micro-batches (validation runs without gradients)
