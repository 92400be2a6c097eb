"""What a training step trains on, and how: batches streamed from the (memory-mapped) training
images, random horizontal flips (train.hflip), micro-batches with accumulated gradients
(train.micro_batch_size) and gradient checkpointing (model.gradient_checkpointing); each against
the step without it, and through interrupted and resumed runs."""

import copy
import threading

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel

from pipeline import loop, training
from pipeline.batches import Batches, batch_indices
from pipeline.checkpoint import Checkpoints
from pipeline.config import TrainParams, from_dict, to_dict
from pipeline.data import ImageSet, to_model_range
from pipeline.distributed import World
from pipeline.noise_scheduler import NoiseScheduler
from pipeline.training import micro_batches, random_hflip, train, train_step
from pipeline.unet import ResBlock, UNet
from test_self_conditioning import SIZE, SMALL, X0, perturbed, seed_with_coin
from test_training import Recorder, assert_same_weights, ema_weights, tiny_data, tiny_params

# ---------------------------------------------------------------------------------------------
# Horizontal flips


def test_each_image_is_mirrored_where_the_generators_coin_says():
    x = torch.rand(16, 3, 4, 5, generator=torch.Generator().manual_seed(0))  # not symmetric
    flipped = random_hflip(x, torch.Generator().manual_seed(7))
    coins = (torch.rand(16, generator=torch.Generator().manual_seed(7)) < 0.5).numpy()
    mirrored = x.numpy()[:, :, :, ::-1]  # the columns in reverse order: left-right
    expected = np.where(coins[:, None, None, None], mirrored, x.numpy())
    assert np.array_equal(flipped.numpy(), expected)
    assert 0 < coins.sum() < 16  # both kinds occur, so the check above tells them apart


def test_half_of_the_images_are_flipped():
    x = torch.tensor([0.0, 1.0]).reshape(1, 1, 1, 2).expand(4000, 1, 1, 2)  # flipped: [1, 0]
    flipped = random_hflip(x, torch.Generator().manual_seed(0))[:, 0, 0, 0]
    assert abs(flipped.mean().item() - 0.5) < 0.03  # 4000 fair coins: sd 0.008


@pytest.mark.parametrize("hflip", [False, True])
def test_batches_are_drawn_by_step_then_flipped_by_the_training_generator(tmp_path, monkeypatch,
                                                                          hflip):
    """The images that the loss sees, against a replay: the indices of each step from
    batch_indices, then a coin per image from the training generator (with hflip only), then
    train_step's timesteps and noise."""
    seen = []
    real_loss = training.batch_loss

    def recording(model, scheduler, x0, *args, **kwargs):
        seen.append(x0.clone())
        return real_loss(model, scheduler, x0, *args, **kwargs)

    monkeypatch.setattr(training, "batch_loss", recording)
    params, data = tiny_params(steps=3, hflip=hflip), tiny_data()
    train(params, data, tmp_path, Recorder())
    replay = torch.Generator().manual_seed(params.train.seed)
    batch, pixels = params.train.batch_size, data.images.numpy()
    for step, x0 in enumerate(seen):
        index = batch_indices(params.train.seed, step, batch, len(pixels)).numpy()
        coins = np.zeros(batch, bool)
        if hflip:
            coins = (torch.rand(batch, generator=replay) < 0.5).numpy()
        torch.randint(params.diffusion.num_timesteps, (batch,), generator=replay)  # train_step's t
        torch.randn(x0.shape, generator=replay)  # and its noise
        expected = np.where(coins[:, None, None, None], pixels[index][..., ::-1], pixels[index])
        assert torch.equal(x0, to_model_range(torch.from_numpy(expected.copy())))
    assert len(seen) == 3 and len({tuple(x.flatten().tolist()) for x in seen}) == 3


def test_batch_indices_are_a_seeded_function_of_the_step():
    first = [batch_indices(0, step, 64, 1000) for step in range(3)]
    assert all(torch.equal(a, b) for a, b in zip(first, [batch_indices(0, s, 64, 1000)
                                                         for s in range(3)]))
    assert not torch.equal(first[0], first[1]) and not torch.equal(first[0], batch_indices(1, 0, 64, 1000))
    counts = torch.bincount(torch.cat([batch_indices(0, s, 1000, 10) for s in range(100)]))
    assert len(counts) == 10 and counts.min() > 9000  # uniform: 10,000 each, sd ~95


# ---------------------------------------------------------------------------------------------
# Streaming: each rank reads its shard's rows of each batch; resumed runs stay bit for bit


class RecordedRows:
    """Stands in for ImageSet.images and records the rows each read takes."""

    def __init__(self, images: torch.Tensor) -> None:
        self.images, self.reads = images, []

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: torch.Tensor) -> torch.Tensor:
        self.reads.append(index.tolist())
        return self.images[index]


def memory_mapped(data: ImageSet, folder) -> ImageSet:
    """data with its images in folder/images.npy, memory-mapped (copy-on-write) as
    ImageSet.load maps them."""
    np.save(folder / "images.npy", data.images.numpy())
    images = torch.from_numpy(np.load(folder / "images.npy", mmap_mode="c"))
    return ImageSet(images, data.labels, data.classes)


def test_each_rank_reads_only_its_shard_of_each_batch_and_the_whole_batchs_labels():
    data = tiny_data(32)
    p = TrainParams(batch_size=8, seed=3)
    steps, shards, loaded = range(5, 9), [], []
    for rank in range(2):
        world = World(rank, 2)
        rows = RecordedRows(data.images)
        with Batches(ImageSet(rows, data.labels, data.classes), p, world.shard(p.batch_size),
                     True, world.device, steps) as batches:
            loaded.append([next(batches) for _ in steps])
        shards.append(rows.reads)
    for i, step in enumerate(steps):
        index = batch_indices(p.seed, step, p.batch_size, len(data)).tolist()
        assert shards[0][i] == index[:4] and shards[1][i] == index[4:]  # disjoint halves
        (x_0, labels_0), (x_1, labels_1) = loaded[0][i], loaded[1][i]
        assert torch.equal(torch.cat([x_0, x_1]), to_model_range(data.images[index]))
        assert torch.equal(labels_0, data.labels[index]) and torch.equal(labels_1, labels_0)
    assert len(shards[0]) == len(shards[1]) == len(steps)  # nothing read beyond the last step


def test_a_read_error_in_the_loader_is_raised_by_the_training_loop_and_stops_the_thread(tmp_path):
    data = tiny_data()

    class Failing(RecordedRows):
        def __getitem__(self, index):
            if len(self.reads) == 3:
                raise OSError("disk gone")
            return super().__getitem__(index)

    logger = Recorder()
    with pytest.raises(OSError, match="disk gone"):
        train(tiny_params(), ImageSet(Failing(data.images), data.labels, data.classes), tmp_path,
              logger, checkpoints=Checkpoints(tmp_path, "0" * 64))
    assert [step for step, _ in logger.metrics] == [2]  # steps 1-3 ran; step 4 had no batch
    assert not [t for t in threading.enumerate() if t.name == "batches"]


def test_a_memory_mapped_set_has_the_identity_of_the_same_images_in_memory(tmp_path, monkeypatch):
    """The identity hashes the images in chunks (a few rows here), never the whole set at once,
    and that is the hash of all of them: a run resumes whichever way its images are held."""
    monkeypatch.setattr(loop, "HASH_CHUNK", 3 * 64)  # 3 images of 8x8 per chunk
    data = tiny_data()
    identity = training.fingerprint(tiny_params(), data)
    assert training.fingerprint(tiny_params(), memory_mapped(data, tmp_path)) == identity
    changed = data.images.clone()
    changed[-1, 0, -1, -1] ^= 1  # one bit of the last chunk
    assert training.fingerprint(tiny_params(), ImageSet(changed, data.labels, data.classes)) != \
        identity


@pytest.mark.parametrize("options", [{}, {"hflip": True, "micro_batch_size": 2}],
                         ids=["plain", "hflip+micro"])
def test_a_run_streamed_from_a_memory_mapped_set_resumes_exactly(tmp_path, options):
    """Killed while logging step 4 (after a checkpoint at 2) and started again, a run on
    memory-mapped images ends with the weights of the uninterrupted run, which are those of the
    run on the same images in memory; the loader's thread is gone after the kill."""
    params = tiny_params(**options)
    (tmp_path / "data").mkdir()
    mapped = memory_mapped(tiny_data(), tmp_path / "data")
    train(params, tiny_data(), tmp_path / "in_memory", Recorder())
    train(params, mapped, tmp_path / "clean", Recorder())
    with pytest.raises(KeyboardInterrupt):
        train(params, mapped, tmp_path / "resumed", Recorder(stop_at=4))
    assert not [t for t in threading.enumerate() if t.name == "batches"]
    logger = Recorder()
    train(params, mapped, tmp_path / "resumed", logger)
    assert [step for step, _ in logger.metrics] == [4, 6]
    assert_same_weights(ema_weights(tmp_path / "in_memory"), ema_weights(tmp_path / "clean"))
    assert_same_weights(ema_weights(tmp_path / "clean"), ema_weights(tmp_path / "resumed"))


# ---------------------------------------------------------------------------------------------
# Micro-batches: the gradients of the passes add up to the whole batch's


def unet(dropout: float = 0.0, **options) -> UNet:
    torch.manual_seed(0)
    return perturbed(UNet(1, SIZE, **{**SMALL, "dropout": dropout}, **options))


def one_step(model, options, seed=0, labels=None, shard=slice(None)):
    """train_step on the rows `shard` of the batch X0 with a learning rate of 0: (loss, gradient
    norm, gradients, the generator's state after it)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    generator = torch.Generator().manual_seed(seed)
    loss, norm = train_step(model, NoiseScheduler(100), optimizer, X0[shard], labels, generator,
                            TrainParams(grad_clip=0.0, **options), shard=shard,
                            batch_size=len(X0))
    return loss, norm, [p.grad.clone() for p in model.parameters()], generator.get_state()


def assert_same_step(a, b, exact=False):
    (loss_a, norm_a, grads_a, state_a), (loss_b, norm_b, grads_b, state_b) = a, b
    assert torch.equal(state_a, state_b)  # the same draws
    rtol = 0 if exact else 1e-5  # float32 sums in another order: ~100 ulps
    assert loss_a == pytest.approx(loss_b, rel=rtol, abs=0)
    assert norm_a == pytest.approx(norm_b, rel=rtol, abs=0)
    for grad_a, grad_b in zip(grads_a, grads_b):
        torch.testing.assert_close(grad_a, grad_b, rtol=rtol, atol=rtol * grad_b.abs().max())


def test_micro_batches_cut_the_shard_into_pieces_of_the_size():
    assert micro_batches(8, 0) == [slice(0, 8)]
    assert micro_batches(8, 2) == [slice(0, 2), slice(2, 4), slice(4, 6), slice(6, 8)]


# Dropout 0: its masks are drawn per pass, so with dropout the passes would draw other masks
# than one pass over the batch (equal in distribution only). GroupNorm normalises each image on
# its own, so nothing else couples the images of a batch.
CASES = {"plain": ({}, {}), "min_snr_gamma": ({}, {"min_snr_gamma": 5.0}),
         "offset_noise": ({}, {"offset_noise": 0.1}),
         "labels dropped": ({"num_classes": 3}, {"cond_drop_prob": 0.3}),
         "self-conditioned": ({"self_condition": True}, {})}


@pytest.mark.parametrize("micro_batch_size", [1, 2])
@pytest.mark.parametrize("case", CASES)
def test_micro_batches_give_the_gradients_and_loss_of_the_whole_batch(case, micro_batch_size):
    unet_options, options = CASES[case]
    model = unet(**unet_options)
    labels = torch.arange(len(X0)) % 3 if "num_classes" in unet_options else None
    # A self-conditioned step estimates x0 first (a coin drawn per step): a seed that does.
    seed = seed_with_coin(NoiseScheduler(100), heads=True) if case == "self-conditioned" else 0
    micro_model, passes = copy.deepcopy(model), []
    micro_model.register_forward_hook(lambda module, args, out: passes.append(len(args[0])))
    micro = one_step(micro_model, {**options, "micro_batch_size": micro_batch_size}, seed, labels)
    assert_same_step(micro, one_step(model, options, seed, labels))
    per_step = 2 if case == "self-conditioned" else 1  # the estimating pass, then the trained one
    assert passes == [micro_batch_size] * (per_step * len(X0) // micro_batch_size)


def test_micro_batches_of_a_shard_give_the_shards_gradients():
    model = unet()
    assert_same_step(one_step(copy.deepcopy(model), {"micro_batch_size": 2}, shard=slice(4, 8)),
                     one_step(model, {}, shard=slice(4, 8)))


@pytest.mark.parametrize("options", [{}, {"hflip": True}, {"offset_noise": 0.1}])
def test_the_shards_of_a_batch_make_the_step_of_the_whole_batch(options):
    """What each DDP rank computes from its rows alone: the draws of the whole batch (the same
    generator state after the step), and a loss and gradients whose mean over the ranks, as
    DistributedDataParallel averages them, are the whole batch's."""
    model = unet()
    whole = one_step(copy.deepcopy(model), options)
    halves = [one_step(copy.deepcopy(model), options, shard=World(rank, 2).shard(len(X0)))
              for rank in range(2)]
    assert all(torch.equal(half[3], whole[3]) for half in halves)
    assert (halves[0][0] + halves[1][0]) / 2 == pytest.approx(whole[0], rel=1e-5)
    for grad_0, grad_1, grad in zip(halves[0][2], halves[1][2], whole[2]):
        torch.testing.assert_close((grad_0 + grad_1) / 2, grad, rtol=1e-5,
                                   atol=1e-5 * grad.abs().max())


def test_one_pass_is_the_step_without_micro_batches_bit_for_bit():
    model = unet()
    assert_same_step(one_step(copy.deepcopy(model), {"micro_batch_size": len(X0)}),
                     one_step(model, {}), exact=True)


@pytest.fixture
def process_group(tmp_path):
    """A gloo process group of this process alone, for a real DistributedDataParallel."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    yield
    dist.destroy_process_group()


def test_under_ddp_the_gradients_are_averaged_once_per_step(process_group):
    """no_sync for all passes but the last: the all-reduce (seen by a communication hook, once
    per bucket of gradients) runs as often as in a step of one pass, on the summed gradients."""
    model = unet()
    reductions = {}
    for micro_batch_size in (0, 2):
        ddp = DistributedDataParallel(copy.deepcopy(model))
        calls = reductions.setdefault(micro_batch_size, [])
        ddp.register_comm_hook(None, lambda state, bucket, calls=calls: (
            calls.append(bucket.index()), default_hooks.allreduce_hook(None, bucket))[1])
        step = one_step(ddp, {"micro_batch_size": micro_batch_size})
        assert_same_step(step, one_step(copy.deepcopy(model), {}))
    assert reductions[2] == reductions[0] and reductions[0]


# ---------------------------------------------------------------------------------------------
# Gradient checkpointing: the same gradients from recomputed activations


def block_calls(model: UNet) -> list[bool]:
    """Whether gradients were on, for every forward call of one of the model's ResBlocks."""
    calls = []
    for module in model.modules():
        if isinstance(module, ResBlock):
            # A pre-hook: the recomputation stops once it has what the backward needs.
            module.register_forward_pre_hook(lambda *_: calls.append(torch.is_grad_enabled()))
    return calls


def saved_bytes(model: UNet, x: torch.Tensor, t: torch.Tensor) -> int:
    """Bytes that autograd keeps for the backward pass of model(x, t)."""
    sizes = []

    def pack(tensor):
        sizes.append(tensor.numel() * tensor.element_size())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(x, t).square().mean().backward()
    return sum(sizes)


def test_checkpointing_recomputes_each_block_in_the_backward_pass_and_keeps_less():
    plain = unet()
    checkpointed = unet(gradient_checkpointing=True)
    calls = block_calls(checkpointed)
    blocks = sum(isinstance(m, ResBlock) for m in checkpointed.modules())
    t = torch.full((len(X0),), 50)
    out = checkpointed(X0, t)
    assert len(calls) == blocks
    out.square().mean().backward()
    assert len(calls) == 2 * blocks  # each block ran again, for its activations
    with torch.no_grad():
        checkpointed(X0, t)  # no gradient, nothing to recompute: checkpointing is off
    assert len(calls) == 3 * blocks
    assert saved_bytes(checkpointed, X0, t) < saved_bytes(plain, X0, t) / 2


@pytest.mark.parametrize("case", ["plain", "self-conditioned"])
def test_checkpointing_gives_the_same_gradients_with_dropout(case):
    """torch.utils.checkpoint replays the forward pass's random state, so the recomputed dropout
    masks are the forward pass's, and the global random state after the step is the same."""
    unet_options, options = CASES[case]
    seed = seed_with_coin(NoiseScheduler(100), heads=True) if case == "self-conditioned" else 0
    model = unet(dropout=0.1, **unet_options)
    steps = []
    for checkpointing, torch_seed in ((False, 1), (True, 1), (False, 2)):
        other = copy.deepcopy(model)
        other.gradient_checkpointing = checkpointing
        torch.manual_seed(torch_seed)  # dropout's masks
        steps.append((*one_step(other, options, seed), torch.get_rng_state()))
    (*plain, after_plain), (*checkpointed, after_checkpointed), (*other_masks, _) = steps
    assert_same_step(checkpointed, plain, exact=True)
    assert torch.equal(after_checkpointed, after_plain)
    assert not torch.equal(other_masks[2][0], plain[2][0])  # dropout is in play: masks matter


# ---------------------------------------------------------------------------------------------
# Whole runs: resumed bit for bit


def interrupted_then_resumed(folder, params, resumed_params=None):
    """A run killed while logging step 4 (its last checkpoint is at 2), then started again
    (with resumed_params, if given); returns the steps the second start logged."""
    with pytest.raises(KeyboardInterrupt):
        train(params, tiny_data(), folder, Recorder(stop_at=4))
    logger = Recorder()
    train(resumed_params or params, tiny_data(), folder, logger)
    return [step for step, _ in logger.metrics]


def test_a_run_with_flips_and_micro_batches_resumes_exactly(tmp_path):
    params = tiny_params(hflip=True, micro_batch_size=2)
    train(params, tiny_data(), tmp_path / "clean", Recorder())
    assert interrupted_then_resumed(tmp_path / "resumed", params) == [4, 6]
    assert_same_weights(ema_weights(tmp_path / "clean"), ema_weights(tmp_path / "resumed"))


def test_a_run_resumes_with_checkpointing_switched_and_stays_the_same_run(tmp_path):
    """Checkpointing on until the kill, off after it (dropout 0.1): the same checkpoints are
    resumed, and the weights are those of a run that never checkpointed."""
    params = tiny_params()
    raw = to_dict(params)
    raw["model"]["gradient_checkpointing"] = True
    train(params, tiny_data(), tmp_path / "clean", Recorder())
    assert interrupted_then_resumed(tmp_path / "switched", from_dict(raw), params) == [4, 6]
    assert_same_weights(ema_weights(tmp_path / "clean"), ema_weights(tmp_path / "switched"))
