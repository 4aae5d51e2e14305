"""The embedding pipeline: inputs -> parallel decode/resize -> micro-batches -> runtime -> vectors.

Decode and resize run in a thread pool (Pillow and torchvision's decoder release the GIL) ahead of the model,
so the model never waits on one core; the runtime runs in the calling thread. On CPU the model runs in small
micro-batches, where this kind of CNN is fastest (activations stay in cache); on CUDA it runs whole batches,
and plain JPEGs are decoded on the GPU.
"""
from __future__ import annotations

import io
import logging
import os
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Iterator, Sequence

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from . import backbones
from .backbones import BackboneSpec
from .cards import register_cards
from .catalog import find_backbone
from .config import Config, resolve_jpeg_decoder
from .errors import BatchError, EmbedderError, ImageDecodeError, NotSupportedByModelError
from .jpeg import JpegDecoder, one_torch_thread
from .inputs import image_list
from .preprocess import ImageInput, Preprocessor, Probe
from .results import BatchResult
from .runtimes import STATIC_MAX_BATCH, create_runtime, resolve_device, resolve_runtime

log = logging.getLogger(__name__)

CPU_MICRO_BATCH = 4  # best per-image throughput of MobileNetV2-class models on CPU (see benchmarks)


class Embedder:
    """Frozen pretrained backbone turning images into embeddings.

    >>> emb = Embedder(model="mobilenet_v2", device="cpu")
    >>> vectors = emb.embed([open("cat.jpg", "rb").read()])   # (1, 1280) float32, L2-normalised

    Keyword arguments override fields of :class:`embedder.config.Config` (which also reads
    ``EMBEDDER_*`` env vars); pass ``config=`` to give a whole Config instead.
    """

    def __init__(self, model: str | None = None, device: str | None = None, *,
                 config: Config | None = None, **overrides: Any) -> None:
        if config is None:
            config = Config.from_env(model=model, device=device, **overrides)
        elif model is not None or device is not None or overrides:
            raise ValueError("pass either config= or individual settings, not both")
        self.config = config
        register_cards(config.card_paths)  # so a card's name is known here, as in `embedder models`
        self.spec: BackboneSpec = find_backbone(config.model, config.data_dir)
        self.device = resolve_device(config.device)
        runtime_name = resolve_runtime(config.runtime, self.device)
        cores = os.cpu_count() or 1
        on_cpu = self.device == "cpu"
        self.micro_batch = config.micro_batch or (CPU_MICRO_BATCH if on_cpu else config.max_batch)
        spec = self.spec
        self.runtime = create_runtime(  # the torch module is built only when the runtime needs it (export, torch)
            runtime_name, spec, lambda: backbones.FrozenBackbone(backbones.load_backbone(spec), spec.preprocessing),
            self.device, cache_dir=config.cache_dir, cache_bytes=config.onnx_cache_bytes,
            threads=config.runtime_threads or cores, precision=config.precision, compile=config.compile,
        )
        self.jpeg_decoder = resolve_jpeg_decoder(config.jpeg_decoder, self.device)
        self.preprocessor = Preprocessor(self.spec.preprocessing, max_pixels=config.max_pixels,
                                         jpeg_decoder=self.jpeg_decoder)
        # On CUDA, JPEGs are decoded (nvJPEG) and resized on the GPU a micro-batch at a time: decode on the CPU
        # cores would be the limit there. On CPU the preprocessor's decode workers run the same decoder per item.
        self.device_decoder = (JpegDecoder(spec.preprocessing, self.device)
                               if not on_cpu and self.jpeg_decoder == "torchvision" else None)
        self.decode_workers = config.decode_workers or cores
        self._pool = ThreadPoolExecutor(self.decode_workers, thread_name_prefix="embedder-decode",
                                        initializer=one_torch_thread if self.jpeg_decoder == "torchvision" else None)
        self._text_tower: Any = None  # a text-image model's text tower, loaded on first use
        self._text_lock = threading.Lock()
        self._closed = False
        log.info("loaded %s on %s via %s (micro-batch %d, %d decode workers, JPEGs decoded by %s on %s)",
                 self.model_id, self.device, self.runtime.name, self.micro_batch, self.decode_workers,
                 self.jpeg_decoder, self.device if self.device_decoder else "cpu")

    @property
    def model_id(self) -> str:
        return self.spec.model_id

    @property
    def dim(self) -> int:
        return self.spec.dim

    def info(self) -> dict[str, Any]:
        """What is loaded, for `embedder models` and the service's model info."""
        pp = self.spec.preprocessing
        return {"name": self.spec.name, "model_id": self.model_id, "dim": self.dim, "device": self.device,
                "runtime": self.runtime.name, "precision": self.config.precision,
                "input_size": pp.crop, "normalize": self.config.normalize, "text": self.spec.has_text}

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Embed texts with a text-image model's text tower, into the space of its images; float32 ``(N, dim)``.

        The tower runs on torch on the CPU whatever the image runtime (texts are short: one forward per call).
        Raises :class:`NotSupportedByModelError` for an image-only model.
        """
        self._check_open()
        if not self.spec.has_text:
            raise NotSupportedByModelError.no_text(self.spec.name)
        texts = list(texts)
        bad = next((i for i, t in enumerate(texts) if not isinstance(t, str) or not t.strip()), None)
        if bad is not None:
            raise ValueError(f"text {bad} is empty or not a string; send non-empty text")
        with self._text_lock:
            if self._text_tower is None:
                self._text_tower = self.spec.text_tower(self.spec.weights.verified_path())
        out = self._text_tower.embed(texts) if texts else np.zeros((0, self.dim), np.float32)
        if self.config.normalize:
            out = out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
        return out.astype(np.float32, copy=False)

    def embed(self, items: Sequence[ImageInput], *, progress: bool = False) -> np.ndarray:
        """Embed images; float32 ``(N, dim)``. Raises :class:`BatchError` if any item fails."""
        result = self.embed_batch(items, progress=progress)
        failed = {i: e for i, e in enumerate(result.errors) if e is not None}
        if failed:
            raise BatchError(failed, len(result.errors))
        return result.vectors

    def embed_batch(self, items: Sequence[ImageInput], *, progress: bool = False) -> BatchResult:
        """Embed images, reporting failures per item instead of raising: one bad image never fails the rest."""
        items = image_list(items)
        self._check_open()
        n = len(items)
        vectors = np.zeros((n, self.dim), dtype=np.float32)
        errors: list[str | None] = [None] * n
        ready_idx: list[int] = []
        ready: list[np.ndarray] = []
        with tqdm(total=n, disable=not progress, unit="img", desc=f"embedding ({self.spec.name})") as bar:
            if self.device_decoder is None:
                rest: list[tuple[int, Probe | None]] = [(i, None) for i in range(n)]  # probed in the decode workers
            else:
                rest = self._embed_on_device(items, vectors, errors, bar)
            for k, arr in self._decoded([(items[i], probe) for i, probe in rest]):
                i = rest[k][0]
                if isinstance(arr, ImageDecodeError):
                    errors[i] = str(arr)  # BatchResult reports messages: the library's boundary
                    bar.update(1)
                    continue
                ready_idx.append(i)
                ready.append(arr)
                if len(ready) == self.micro_batch:
                    vectors[ready_idx] = self._forward(ready)
                    bar.update(len(ready))
                    ready_idx, ready = [], []
            if ready:
                vectors[ready_idx] = self._forward(ready)
                bar.update(len(ready))
        return BatchResult(vectors, errors)

    def _embed_on_device(self, items: Sequence[ImageInput], vectors: np.ndarray, errors: list[str | None],
                         bar: tqdm) -> list[tuple[int, Probe]]:
        """Probe every item; embed the clean JPEGs the device decodes, a micro-batch at a time; return the rest
        (index and probe) for the decode workers. Items the probe refuses get their message in ``errors``."""
        rest: list[tuple[int, Probe]] = []
        for s in range(0, len(items), self.micro_batch):
            jpegs: list[tuple[int, Probe]] = []
            for i in range(s, min(s + self.micro_batch, len(items))):
                try:
                    probe = self.preprocessor.probe(items[i])
                except ImageDecodeError as e:
                    errors[i] = str(e)
                    bar.update(1)
                    continue
                # A JPEG file is read in a decode worker, as the Preprocessor does for any path.
                on_device = probe.clean_jpeg and isinstance(items[i], (bytes, bytearray, memoryview))
                (jpegs if on_device else rest).append((i, probe))
            crops, taken = self.device_decoder([items[i] for i, _ in jpegs])
            rest += [job for job, t in zip(jpegs, taken) if not t]  # torchvision could not: Pillow decodes or says why
            idx = [i for (i, _), t in zip(jpegs, taken) if t]
            if idx:
                vectors[idx] = self._forward(crops)
                bar.update(len(idx))
        return rest

    def embed_arrays(self, images: np.ndarray) -> np.ndarray:
        """Run already-preprocessed uint8 ``(N, crop, crop, 3)`` images through the model, in micro-batches."""
        return np.concatenate([self._forward(images[s:s + self.micro_batch])
                               for s in range(0, len(images), self.micro_batch)] or
                              [np.zeros((0, self.dim), np.float32)])

    def warm_up(self) -> None:
        """Run every batch size :meth:`embed_arrays` can send the runtime once, so no caller pays for a first use.

        On CPU those are 1 to ``micro_batch`` (OpenVINO compiles a model per batch size up to
        :data:`~embedder.runtimes.STATIC_MAX_BATCH`, ~0.2 s each; larger ones share one); on CUDA one full batch.
        """
        crop = self.spec.preprocessing.crop
        jpeg = io.BytesIO()
        Image.new("RGB", (crop, crop), (128, 128, 128)).save(jpeg, "JPEG")
        self.submit(jpeg.getvalue()).result()  # imports the JPEG decoder (~1.2 s for torchvision) before any caller
        small = range(1, min(self.micro_batch, STATIC_MAX_BATCH) + 1) if self.device == "cpu" else ()
        sizes = sorted({*small, self.micro_batch})
        for n in sizes:
            self.runtime.run(np.zeros((n, crop, crop, 3), np.uint8))

    def _forward(self, images: Sequence[np.ndarray] | np.ndarray | Any) -> np.ndarray:
        if not isinstance(images, (np.ndarray, list, tuple)):
            # a torch.Tensor of device-decoded crops: the torch runtime takes them where they are
            batch = images if self.runtime.name == "torch" else np.ascontiguousarray(images.cpu().numpy())
        else:
            batch = np.ascontiguousarray(np.stack(images) if not isinstance(images, np.ndarray) else images)
        out = self.runtime.run(batch)
        if self.config.normalize:
            norms = np.linalg.norm(out, axis=1, keepdims=True)
            out = out / np.maximum(norms, 1e-12)
        return out.astype(np.float32, copy=False)

    def _decoded(self, items: Sequence[tuple[ImageInput, Probe | None]]
                 ) -> Iterator[tuple[int, np.ndarray | ImageDecodeError]]:
        """Yield ``(index, uint8 array or the item's error)`` in input order for ``(item, probe or None)`` pairs,
        decoding ahead in the pool.

        A bounded window is in flight (a crop is ~150 KB, so memory stays bounded for any input length). It is
        wide because decode times vary ~10x with image size: with a narrow one (8 items) the model waited on one
        large image at the head while the workers sat idle; 64 ran ~5-10% faster here.
        """
        ahead = max(8 * self.micro_batch, 32 * self.decode_workers)
        pending: deque[tuple[int, Future]] = deque()
        for i, (item, probe) in enumerate(items):
            pending.append((i, self.submit(item, probe)))
            if len(pending) >= ahead:
                yield _outcome(*pending.popleft())
        while pending:
            yield _outcome(*pending.popleft())

    def probe(self, item: ImageInput) -> Probe:
        """Read ``item``'s header once (:meth:`Preprocessor.probe`); the batcher budgets its ``pixels``.

        Raises :class:`ImageDecodeError` for an input that cannot be decoded or is above ``max_pixels``.
        """
        return self.preprocessor.probe(item)

    def submit(self, item: ImageInput, probe: Probe | None = None) -> Future:
        """Decode and preprocess one item in the decode pool (:meth:`Preprocessor.prepare`).

        The future holds the uint8 ``(crop, crop, 3)`` array, or fails with the item's :class:`ImageDecodeError`.
        Pass the item's :meth:`probe` when it was probed already (the batcher does, on arrival).
        """
        self._check_open()
        return self._pool.submit(self.preprocessor.prepare, item, probe)

    def prepare(self, item: ImageInput) -> np.ndarray:
        """One item -> uint8 ``(crop, crop, 3)`` array for :meth:`embed_arrays`, in this thread.

        Raises :class:`ImageDecodeError` for a bad item.
        """
        return self.preprocessor.prepare(item)

    def close(self) -> None:
        self._closed = True
        self._pool.shutdown(wait=True)

    def _check_open(self) -> None:
        if self._closed:
            raise EmbedderError("this Embedder is closed (close() or its `with` block ended); create a new one")

    def __enter__(self) -> "Embedder":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _outcome(index: int, decode: Future) -> tuple[int, np.ndarray | ImageDecodeError]:
    """``(index, crop)``, or ``(index, the item's ImageDecodeError)`` as an object; any other failure is raised."""
    error = decode.exception()
    return index, error if isinstance(error, ImageDecodeError) else decode.result()
