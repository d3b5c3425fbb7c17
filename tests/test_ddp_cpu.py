"""Every architecture of ours through nnU-Net's DDP code path: 2 CPU processes, ``gloo``, real data.

What runs is nnU-Net's: ``get_trainer_from_args`` and ``maybe_load_checkpoint`` (as in ``run_ddp``), the
trainer's ``run_training`` (its ``initialize`` wraps the network in DDP, ``_set_batch_size_and_oversample``
splits the plans' batch over the ranks, the losses and the validation counts are all-gathered) on the
bundled hippocampus data, planned by the stock command. Only nnU-Net's three CUDA assumptions are
adapted, here in the test (nnU-Net refuses DDP on anything but CUDA, so no user needs them):

- ``run_ddp`` initialises ``nccl`` and calls ``torch.cuda.set_device``: the worker initialises ``gloo``;
- ``__init__`` under DDP replaces the device by ``cuda:<rank>`` and makes a CUDA grad scaler: both are set
  back to the CPU / none right after construction;
- ``initialize`` passes ``device_ids=[rank]``, which DDP rejects for CPU modules: nnU-Net's name ``DDP``
  is replaced by a wrapper that drops ``device_ids`` on the CPU and records the other arguments.

Each rank starts from other random weights and draws other batches; afterwards every parameter must be
bitwise equal across ranks, every trained parameter must have had a gradient at every step, and DDP ran
without ``find_unused_parameters``. The pretrained Swin-UMamba trainers load a VMamba-Tiny-layout
checkpoint written here and are checked across their frozen and unfrozen epochs, one of them through an
interruption and nnU-Net's ``--c`` resume. Tiny patches, a batch of 2, 2 iterations per epoch.
"""
from __future__ import annotations

import datetime
import json
import os
import random
from unittest import mock

import pytest
import torch

pytestmark = pytest.mark.ddp

WORLD = 2
WEIGHTS_ENV = "NNUNET_MOE_VMAMBA_WEIGHTS"
P3, P3_SMT, P2 = [32, 32, 32], [32, 64, 32], [32, 32]  # Swin SMT needs one axis of 64 (bottleneck voxels)
RUNS = [
    dict(name="swin_smt_small_3d", trainer="nnUNetTrainerSwinSMTSmall", configuration="3d_fullres", patch=P3_SMT),
    dict(name="swin_umamba_2d", trainer="nnUNetTrainerSwinUMambaScratch", configuration="2d", patch=P2),
    dict(name="swin_umamba_d_2d", trainer="nnUNetTrainerSwinUMambaDScratch", configuration="2d", patch=P2),
    dict(name="swin_umamba_d_3d", trainer="nnUNetTrainerSwinUMambaDScratch", configuration="3d_fullres", patch=P3),
    # frozen epoch 0, unfrozen epoch 1 (one iteration each: the slowest network here). Its unfrozen step is
    # also the 3D run of nnUNetTrainerSwinUMambaScratch (same network, every parameter trains), left out for time.
    dict(name="swin_umamba_pretrained_3d", trainer="nnUNetTrainerSwinUMamba", configuration="3d_fullres", patch=P3,
         epochs=2, iters=1, freeze=1, weights=True),
    # frozen epochs 0-1, interrupted after epoch 0, resumed with --c: epoch 1 frozen, epoch 2 not
    dict(name="swin_umamba_d_pretrained_3d_resumed", trainer="nnUNetTrainerSwinUMambaD", configuration="3d_fullres",
         patch=P3, epochs=3, freeze=2, weights=True, interrupt_after=1),
    dict(name="nmsw_3d", trainer="nnUNetTrainerNMSW", configuration="3d_fullres", patch=P3),
    dict(name="moe_sam_small_2d", trainer="nnUNetTrainerMoESAMSmall", configuration="2d", patch=P2),
    # plain hippocampus: one modality (dense Swin-Unet MLPs); runs the partial-label loss's DDP batch-Dice gathering
    dict(name="m4oe_2d", trainer="nnUNetTrainerM4oE", configuration="2d", patch=P2),
]


# ----------------------------------------------------------------------------------- worker (each rank)
class _Interrupted(Exception):
    """Stands in for a killed run: raised on both ranks after an epoch's checkpoint."""


def _flat(network) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in network.parameters()])


def _cpu_ddp(record: dict):
    """nnU-Net's ``DDP(network, device_ids=[rank])`` for a CPU module (DDP wants ``device_ids=None`` there)."""
    from torch.nn.parallel import DistributedDataParallel

    def wrap(module, device_ids=None, **kwargs):
        record.update(ddp_kwargs=sorted(kwargs), weights_before_wrap=float(_flat(module).double().sum()))
        on_cpu = all(p.device.type == "cpu" for p in module.parameters())
        return DistributedDataParallel(module, device_ids=None if on_cpu else device_ids, **kwargs)
    return wrap


def _record_steps(trainer, steps: list, checkpoint: dict | None):
    """Wrap ``trainer.train_step``: after each step, which parameters had no gradient, which changed."""
    from nnunet_moe.networks.unwrap import unwrap_network

    original = trainer.train_step

    def train_step(batch):
        network = unwrap_network(trainer.network)
        params = dict(network.named_parameters())
        frozen_ids = {id(p) for p in getattr(trainer.optimizer, "frozen", [])}
        frozen = [n for n, p in params.items() if id(p) in frozen_ids]
        before = {n: p.detach().clone() for n, p in params.items()}
        entry = dict(epoch=trainer.current_epoch, batch=list(batch["data"].shape),
                     data_sum=float(batch["data"].double().sum()), frozen=frozen)
        if checkpoint is not None:  # encoder parameters that hold the checkpoint's values before this step
            entry["equal_to_checkpoint"] = [
                n for n, p in params.items() if n.startswith("encoder.") and n[8:] in checkpoint
                and checkpoint[n[8:]].shape == p.shape and torch.equal(checkpoint[n[8:]], p.detach())]
        out = original(batch)
        entry["no_grad"] = [n for n, p in params.items() if p.requires_grad and id(p) not in frozen_ids
                            and p.grad is None]
        entry["changed"] = [n for n, p in params.items() if not torch.equal(before[n], p.detach())]
        entry["untrained"] = [n for n, p in params.items() if not p.requires_grad]
        entry["loss"] = float(out["loss"])
        steps.append(entry)
        return out
    trainer.train_step = train_step


def _train(rank: int, run: dict, resume: bool, weights: str, checkpoint: dict | None) -> dict:
    import torch.distributed as dist
    from nnunetv2.run.run_training import get_trainer_from_args, maybe_load_checkpoint
    from nnunetv2.training.nnUNetTrainer import nnUNetTrainer as trainer_module

    from nnunet_moe.networks.unwrap import unwrap_network

    torch.manual_seed(1000 * rank + 1)  # other initial weights per rank: DDP's broadcast must align them
    random.seed(rank)
    import numpy as np
    np.random.seed(rank)
    if run.get("weights") and not resume:
        os.environ[WEIGHTS_ENV] = weights
    else:  # a resumed run must take everything from its checkpoint
        os.environ.pop(WEIGHTS_ENV, None)
    trainer = get_trainer_from_args("501", run["configuration"], 0, run["trainer"], run["plans"], resume,
                                    device=torch.device("cpu"))
    trainer.device, trainer.grad_scaler = torch.device("cpu"), None  # nnU-Net's DDP __init__ chose cuda:<rank>
    trainer.num_epochs = run.get("epochs", 1)
    trainer.num_iterations_per_epoch, trainer.num_val_iterations_per_epoch = run.get("iters", 2), 1
    trainer.logger.plot_progress_png = lambda *args: None  # matplotlib on rank 0: seconds, nothing DDP
    if "freeze" in run:
        trainer.freeze_encoder_epochs = run["freeze"]
    if "interrupt_after" in run and not resume:
        trainer.save_every = 1  # checkpoint_latest.pth after every epoch, as the short schedules do
        on_epoch_end = trainer.on_epoch_end

        def interrupting_epoch_end():
            on_epoch_end()
            if trainer.current_epoch == run["interrupt_after"]:
                raise _Interrupted
        trainer.on_epoch_end = interrupting_epoch_end
    else:  # checkpoints of these networks are hundreds of MB: only the interrupted run needs one
        trainer.disable_checkpointing = True
    steps, record = [], {}
    _record_steps(trainer, steps, checkpoint)
    with mock.patch.object(trainer_module, "DDP", _cpu_ddp(record)):
        maybe_load_checkpoint(trainer, resume, False)
        try:
            trainer.run_training()
        except _Interrupted:
            pass
    network = unwrap_network(trainer.network)
    mine = _flat(network)
    rank0 = mine.clone()
    dist.broadcast(rank0, src=0)
    names = [n for n, _ in network.named_parameters()]
    sizes = [p.numel() for p in network.parameters()]
    differing = [n for n, a, b in zip(names, mine.split(sizes), rank0.split(sizes)) if not torch.equal(a, b)]
    loss = trainer.loss
    for inner in ("loss", "term"):  # nnU-Net's deep-supervision wrapper; NMSWLoss's Dice+CE term
        loss = getattr(loss, inner, loss)
    log = ""
    if rank == 0:  # nnU-Net logs on rank 0 only
        with open(trainer.log_file) as f:
            log = f.read()
    return dict(steps=steps, differing_from_rank0=differing, n_params=len(names), is_ddp=trainer.is_ddp,
                wrapped=type(trainer.network).__name__, find_unused=trainer.network.find_unused_parameters,
                batch_size=trainer.batch_size, global_batch=trainer.configuration_manager.batch_size,
                oversample=trainer.oversample_foreground_percent,
                dice_all_gather=bool(getattr(loss, "dc", loss).ddp),  # nnU-Net's Dice term, or our loss itself
                train_losses=[float(x) for x in trainer.logger.get_value("train_losses", step=None)],
                log=log, **record)


def _worker(rank: int, runs: list, out_dir: str, weights: str) -> None:
    import time

    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(minutes=5))
    checkpoint = torch.load(weights, map_location="cpu", weights_only=True)["model"]
    try:
        for run in runs:
            start = time.time()
            result = {"phases": []}
            for resume in ((False, True) if "interrupt_after" in run else (False,)):
                result["phases"].append(_train(rank, run, resume, weights, checkpoint if run.get("weights") else None))
                dist.barrier()  # rank 0 has written the checkpoint the resumed phase reads
            result["seconds"] = time.time() - start
            with open(os.path.join(out_dir, f"{run['name']}.{rank}.json"), "w") as f:
                json.dump(result, f)
    finally:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------- parent
def _write_vmamba_tiny(path: str) -> None:
    """A checkpoint in the VMamba-Tiny release layout (dict key 'model', RGB patch-4 embedding, head)."""
    from nnunet_moe.networks.swin_umamba import VSSEncoder

    torch.manual_seed(0)
    state = VSSEncoder(in_channels=3, patch_size=4, spatial_dims=2).state_dict()
    state.update({"norm.weight": torch.ones(768), "norm.bias": torch.zeros(768),
                  "head.weight": torch.zeros(1000, 768), "head.bias": torch.zeros(1000)})
    torch.save({"model": state}, path)


@pytest.fixture(scope="module")
def ddp_results(nnunet_env, tmp_path_factory):
    from nnunetv2.run.run_training import find_free_network_port

    env, ds = nnunet_env["train_env"], nnunet_env["dataset"]
    pre = os.path.join(env["nnUNet_preprocessed"], ds.name)
    with open(os.path.join(pre, "nnUNetPlans.json")) as f:
        planned = json.load(f)
    runs = []
    for run in RUNS:  # the planned data, with a tiny patch and a batch of 2 (one sample per rank)
        plans = json.loads(json.dumps(planned))
        plans["plans_name"] = f"nnUNetPlansDDP_{run['name']}"
        plans["configurations"][run["configuration"]].update(patch_size=run["patch"], batch_size=2)
        with open(os.path.join(pre, plans["plans_name"] + ".json"), "w") as f:
            json.dump(plans, f)
        runs.append(dict(run, plans=plans["plans_name"]))
    out = tmp_path_factory.mktemp("ddp")
    weights = str(out / "vssmtiny.pth")
    _write_vmamba_tiny(weights)
    error = None
    with pytest.MonkeyPatch.context() as patch:  # spawned workers inherit this environment
        for key, value in env.items():
            patch.setenv(key, value)
        patch.setenv("MASTER_ADDR", "127.0.0.1")
        patch.setenv("MASTER_PORT", str(find_free_network_port()))
        patch.delenv(WEIGHTS_ENV, raising=False)
        try:
            torch.multiprocessing.spawn(_worker, args=(runs, str(out), weights), nprocs=WORLD, join=True)
        except Exception as err:  # noqa: BLE001 - the tests of the runs that did not finish report it
            error = err
    results = {}
    for run in RUNS:
        files = [out / f"{run['name']}.{rank}.json" for rank in range(WORLD)]
        if all(f.is_file() for f in files):
            results[run["name"]] = [json.loads(f.read_text()) for f in files]
            print(f"DDP run {run['name']}: {results[run['name']][0]['seconds']:.1f} s")
    return {"results": results, "error": error, "weights": weights}


def _ranks(ddp_results, name):
    if name not in ddp_results["results"]:
        pytest.fail(f"DDP run {name} did not finish: {ddp_results['error']}")
    return ddp_results["results"][name]


@pytest.mark.parametrize("run", RUNS, ids=lambda r: r["name"])
def test_ddp_trains_in_sync_without_unused_parameters(ddp_results, run):
    ranks = _ranks(ddp_results, run["name"])
    for phase in range(len(ranks[0]["phases"])):
        r0, r1 = (r["phases"][phase] for r in ranks)
        for r in (r0, r1):
            assert r["is_ddp"] and r["wrapped"] == "DistributedDataParallel"
            assert r["find_unused"] is False and "find_unused_parameters" not in r["ddp_kwargs"]
            assert r["steps"], "no training step ran"
            for step in r["steps"]:
                assert step["no_grad"] == [], f"epoch {step['epoch']}: trained parameters without gradient"
                assert step["batch"][0] == r["batch_size"]
        # nnU-Net's batch split: the plans' 2 samples, one per rank, the second one foreground-oversampled
        assert r0["global_batch"] == 2 and (r0["batch_size"], r1["batch_size"]) == (1, 1)
        assert (r0["oversample"], r1["oversample"]) == (0.0, 1.0)
        # other weights before the wrap, other batches, yet the same parameters afterwards
        assert r0["weights_before_wrap"] != r1["weights_before_wrap"]
        assert all(a["data_sum"] != b["data_sum"] for a, b in zip(r0["steps"], r1["steps"]))
        assert r0["differing_from_rank0"] == [] and r1["differing_from_rank0"] == []
        assert r0["train_losses"] == r1["train_losses"]  # all-gathered: the mean over both ranks
        assert len(r0["steps"][-1]["changed"]) > 0.5 * r0["n_params"]
    if run["configuration"] == "2d":  # batch Dice: tp/fp/fn all-gathered over the ranks in the loss
        assert ranks[0]["phases"][0]["dice_all_gather"]


@pytest.mark.parametrize("run", [r for r in RUNS if r.get("weights")], ids=lambda r: r["name"])
def test_ddp_pretrained_freezes_exactly_what_was_loaded(ddp_results, run):
    ranks = _ranks(ddp_results, run["name"])
    first = ranks[0]["phases"][0]["steps"][0]
    # every frozen parameter was loaded from the checkpoint; every loaded one but the patch embedding is frozen
    loaded = set(first["equal_to_checkpoint"])
    assert set(first["frozen"]) == {n for n in loaded if not n.startswith("encoder.patch_embed.")}
    assert len(first["frozen"]) == 90  # 3D: of 208 encoder tensors; scan projections, dt, A, D etc. do not fit
    assert any(".x_proj_weight" in n for n in first["changed"])  # not loaded: trains from the start
    for rank in ranks:
        steps = [s for phase in rank["phases"] for s in phase["steps"]]
        assert [s["epoch"] for s in steps] == [e for e in range(run["epochs"]) for _ in range(run.get("iters", 2))]
        changed_after = set()
        for step in steps:
            assert step["untrained"] == []  # requires_grad is never switched off (DDP could not take it)
            if step["epoch"] < run["freeze"]:
                assert step["frozen"] == first["frozen"]
                assert not set(step["frozen"]) & set(step["changed"]), "a frozen parameter changed"
                assert set(step["frozen"]) <= set(step["equal_to_checkpoint"])
            else:  # they now have gradients (no_grad == [], tested above) and train: (almost) all of them move
                assert step["frozen"] == []
                changed_after |= set(step["changed"])
        assert len(set(first["frozen"]) - changed_after) <= len(first["frozen"]) // 20
    log = ranks[0]["phases"][0]["log"]
    assert "VSS encoder frozen until epoch" in log and "90 of 208 parameter tensors" in log
    assert "layers.*.blocks.*.ln_1.weight x15" in log and "layers.*.blocks.*.self_attention.x_proj_weight" in log


def test_ddp_resume_keeps_the_frozen_set(ddp_results):
    """The interrupted run resumed (nnU-Net's --c, no weights variable): epoch 1 frozen as before, epoch 2 not."""
    ranks = _ranks(ddp_results, "swin_umamba_d_pretrained_3d_resumed")
    for rank in ranks:
        before, after = rank["phases"]
        assert [s["epoch"] for s in before["steps"]] == [0, 0]
        assert [s["epoch"] for s in after["steps"]] == [1, 1, 2, 2]
        assert after["steps"][0]["frozen"] == after["steps"][1]["frozen"] == before["steps"][0]["frozen"] != []
        assert after["steps"][2]["frozen"] == after["steps"][3]["frozen"] == []
    assert "VSS encoder frozen until epoch 2: 90 of 208" in ranks[0]["phases"][1]["log"]
    assert "VSS encoder unfrozen at epoch 2" in ranks[0]["phases"][1]["log"]
