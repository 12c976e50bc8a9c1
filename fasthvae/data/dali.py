"""The NVIDIA DALI loader (optional extra ``fasthvae[dali]``, package ``nvidia-dali-cuda130``).

One pipeline graph for both devices: on a GPU the augmentations run as GPU operators and the
batches reach PyTorch through ``DALIGenericIterator`` without a host copy; with ``device_id=None``
the same graph runs with CPU operators (how it is tested on machines without a GPU).

- In-memory datasets (CIFAR-10): uint8 HWC images enter through ``fn.external_source`` in the
  epoch's order (the order and sharding every fasthvae loader uses), then
  pad-and-crop (``fn.crop`` with padding, then a random window), mirror and scale to [0, 1] in
  one ``fn.crop_mirror_normalize`` to CHW float.
- Image folders: ``fn.readers.file`` + ``fn.decoders.image`` (``device="mixed"`` on a GPU: nvJPEG)
  + ``fn.resize`` to the model's size, then the same augmentations.
"""

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from fasthvae.data.common import LoaderOptions, batches_per_epoch, shard_order
from fasthvae.data.sources import check_images

# Encoded files the folder reader holds to shuffle from: a window, so folders larger than memory
# stream through it (each file is still read once per epoch).
SHUFFLE_BUFFER = 4096
INSTALL_HINT = "DALI is not installed: pip install 'fasthvae[dali]' (package nvidia-dali-cuda130)"


def _dali():
    try:
        import nvidia.dali  # noqa: F401
    except ImportError as err:
        raise ImportError(INSTALL_HINT) from err
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

    return fn, pipeline_def, types, DALIGenericIterator, LastBatchPolicy


def dali_available() -> bool:
    try:
        _dali()
    except ImportError:
        return False
    return True


def dali_gpu_problem(device_id: int = 0) -> str | None:
    """Why DALI cannot run GPU operators on GPU ``device_id`` (not installed, no GPU, a driver older
    than the CUDA DALI was built for), or None when a one-operator GPU pipeline runs."""
    try:
        fn, pipeline_def, _, _, _ = _dali()
    except ImportError as err:
        return str(err)

    @pipeline_def(batch_size=1, num_threads=1, device_id=device_id)
    def probe():
        return fn.external_source(source=lambda: [np.zeros(4, np.uint8)], batch=True, device="gpu")

    try:
        pipe = probe()
        pipe.build()
        pipe.run()
    except Exception as err:  # DALI raises RuntimeError and others, with the driver's message
        first_line = (str(err).strip().splitlines() or [""])[0]
        return f"DALI cannot run on GPU {device_id}: {type(err).__name__}: {first_line}"
    return None


class _EpochFeeder:
    """``external_source`` callback: batch ``start + i`` of the current epoch order, StopIteration
    after the last."""

    def __init__(self, images: np.ndarray, batch_size: int, n_batches: int) -> None:
        self.images = images
        self.batch_size = batch_size
        self.n_batches = n_batches
        self.order = np.zeros(0, dtype=np.int64)
        self.start = 0

    def __call__(self, info) -> tuple[np.ndarray, np.ndarray]:
        """The batch as two arrays, batch dimension first (one gather, no per-image Python objects)."""
        batch = self.start + info.iteration
        if batch >= self.n_batches:
            raise StopIteration
        idx = self.order[batch * self.batch_size : (batch + 1) * self.batch_size]
        return self.images[idx], idx.astype(np.int64).reshape(-1, 1)


def _augment(images, options: LoaderOptions, size: tuple[int, int], device: str):
    """Pad-and-crop, mirror and scale to CHW float in [0, 1]: the graph both modes share."""
    fn, _, types, _, _ = _dali()
    h, w = size
    crop = {}
    if options.pad_crop:
        p = options.pad_crop
        images = fn.crop(
            images,
            crop=(h + 2 * p, w + 2 * p),
            crop_pos_x=0.5,
            crop_pos_y=0.5,
            out_of_bounds_policy="pad",
            fill_values=0,
            device=device,
        )
        offsets = [k / (2 * p) for k in range(2 * p + 1)]  # every integer offset equally likely
        crop = {
            "crop": (h, w),
            "crop_pos_x": fn.random.uniform(values=offsets),
            "crop_pos_y": fn.random.uniform(values=offsets),
        }
    mirror = fn.random.coin_flip(probability=0.5) if options.flip else 0
    return fn.crop_mirror_normalize(
        images,
        mirror=mirror,
        dtype=types.FLOAT,
        output_layout="CHW",
        mean=[0.0],
        std=[255.0],
        device=device,
        **crop,
    )


def _device_id(device: torch.device) -> int | None:
    if device.type == "cuda":
        return device.index if device.index is not None else torch.cuda.current_device()
    if device.type != "cpu":
        raise ValueError(f"the DALI loader runs on cpu or cuda, not {device}")
    return None


class _DaliBase:
    options: LoaderOptions
    device: torch.device

    def _wrap(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        x = batch["images"]
        if self.options.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, batch["indices"].reshape(-1).to(self.device)


class DaliLoader(_DaliBase):
    """DALI over an in-memory uint8 [N, H, W, 3] array, in fasthvae's epoch order.

    Crops and flips come from the pipeline's own RNG, which runs on across epochs: a resumed run
    (at an epoch or mid-epoch) sees the same images in the same batches, but not the same flips.
    """

    def __init__(
        self,
        images: np.ndarray,
        options: LoaderOptions,
        device: str | torch.device = "cpu",
        num_threads: int = 2,
        prefetch: int = 2,
    ) -> None:
        fn, pipeline_def, types, iterator_cls, last_batch = _dali()
        self.images = check_images(images, "DaliLoader")
        self.options, self.device, self.epoch, self.start_batch = options, torch.device(device), 0, 0
        self.feeder = _EpochFeeder(self.images, options.batch_size, len(self))
        op_device = "gpu" if self.device.type == "cuda" else "cpu"

        @pipeline_def
        def pipeline():
            images, indices = fn.external_source(
                source=self.feeder,
                num_outputs=2,
                batch=True,
                batch_info=True,
                layout=["HWC", ""],
                dtype=[types.UINT8, types.INT64],
            )
            if op_device == "gpu":
                images = images.gpu()
            return _augment(images, options, self.images.shape[1:3], op_device), indices

        self._pipe = pipeline(
            batch_size=options.batch_size,
            num_threads=num_threads,
            device_id=_device_id(self.device),
            seed=options.seed + 7919 * options.rank,
            prefetch_queue_depth=prefetch,
        )
        self._iterator_args = (iterator_cls, last_batch)
        self._iterator = None
        self.batches_in_flight = prefetch

    def __len__(self) -> int:
        return batches_per_epoch(len(self.images), self.options)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.feeder.order = shard_order(len(self.images), self.options, self.epoch).numpy()
        self.feeder.start = self.start_batch
        if self._iterator is None:  # built here: building starts prefetching from the feeder
            iterator_cls, last_batch = self._iterator_args
            self._iterator = iterator_cls(
                self._pipe, ["images", "indices"], auto_reset=False, last_batch_policy=last_batch.PARTIAL
            )
        else:
            self._iterator.reset()
        for batch in self._iterator:
            yield self._wrap(batch[0])


class DaliFolderLoader(_DaliBase):
    """DALI over image files: ``fn.readers.file`` + ``fn.decoders.image`` + ``fn.resize``.

    Yields the same ``(images, indices)`` batches, ``indices`` being positions in ``files``. The
    reader shuffles from ``options.seed`` and shards by rank; every epoch reads each file of this
    rank's shard exactly once.
    """

    def __init__(
        self,
        files: Sequence[Path],
        options: LoaderOptions,
        size: int = 32,
        device: str | torch.device = "cpu",
        num_threads: int = 2,
        shuffle_buffer: int = SHUFFLE_BUFFER,
        prefetch: int = 2,
    ) -> None:
        fn, pipeline_def, types, iterator_cls, last_batch = _dali()
        if not files:
            raise ValueError("DaliFolderLoader: no image files given")
        self.files = [str(f) for f in files]
        self.options, self.device = options, torch.device(device)
        decode_device = "mixed" if self.device.type == "cuda" else "cpu"
        op_device = "gpu" if self.device.type == "cuda" else "cpu"

        @pipeline_def
        def pipeline():
            encoded, indices = fn.readers.file(
                files=self.files,
                labels=list(range(len(self.files))),
                random_shuffle=options.shuffle,
                initial_fill=min(len(self.files), shuffle_buffer),
                shard_id=options.rank,
                num_shards=options.world_size,
                stick_to_shard=True,
                pad_last_batch=True,
                name="Reader",
            )
            images = fn.decoders.image(encoded, device=decode_device, output_type=types.RGB)
            images = fn.resize(images, size=(size, size), device=op_device)
            return _augment(images, options, (size, size), op_device), fn.cast(indices, dtype=types.INT64)

        pipe = pipeline(
            batch_size=options.batch_size,
            num_threads=num_threads,
            device_id=_device_id(self.device),
            seed=options.seed + 7919 * options.rank,
            prefetch_queue_depth=prefetch,
        )
        self.batches_in_flight = prefetch
        policy = last_batch.DROP if options.drop_last else last_batch.PARTIAL
        self._iterator = iterator_cls(
            pipe, ["images", "indices"], reader_name="Reader", auto_reset=True, last_batch_policy=policy
        )

    def __len__(self) -> int:
        return len(self._iterator)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """The reader reshuffles by itself every epoch (from the pipeline seed), so ``epoch`` is not
        needed; ``start_batch`` batches are read and dropped (the reader has no random access)."""
        self.start_batch = start_batch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for i, batch in enumerate(self._iterator):
            if i >= self.start_batch:
                yield self._wrap(batch[0])
