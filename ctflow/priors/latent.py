r"""Latent flow priors: a velocity field in a latent space plus a decoder to images.

A latent prior models images :math:`x = D(z_1)` where :math:`z_1` is the end point of the
generative ODE :math:`\dot z = v(z, t)` in a latent space (noise at :math:`t = 0`, data at
:math:`t = 1`, as for every ctflow prior). It offers the interface the flow solvers use:

* ``velocity(z, t)`` — the velocity field on latents ``(B, *latent_shape)``;
* ``to_model(x)`` — the *encoder* :math:`E`: public images in :math:`[0, 1]`,
  ``(B, channels, image_size, image_size)``, to latents (used for initialisation only);
* ``from_model(z)`` — the *decoder* :math:`D`: latents to public images (not clipped);
* ``image_size``, ``channels`` (of the images, so operators and measurements are checked as
  for an image-space prior), ``latent_shape``, ``hu_window``, and ``is_latent = True``.

The solvers that accept latent priors (MS-Flow and D-Flow; see :mod:`ctflow.solvers.latent`)
keep their states in latent space and see the data through the decoder,
:math:`\tfrac1{2\sigma^2}\|A\,D(z) - y\|^2`. Other solvers refuse latent priors with a
``ValueError``.

Bundled latent priors are one safetensors file plus one JSON description with
``"kind": "latent"`` (tensors ``flow.*``: the U-Net velocity; ``codec.*``: the autoencoder of
:mod:`ctflow.flow.autoencoder` and its latent normalisation), loaded by
:func:`ctflow.priors.load_prior` like any other prior.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch

from ctflow.flow.autoencoder import AutoEncoder, LatentCodec
from ctflow.flow.integrate import integrate
from ctflow.priors.base import FlowPrior
from ctflow.priors.checkpoint_io import (FORMAT_VERSION, PRIOR_FORMAT, CheckpointError,
                                         build_velocity, check_state, write_checkpoint)

__all__ = ["LatentFlowPrior", "is_latent_prior", "save_latent_prior",
           "latent_prior_from_checkpoint", "LATENT_KIND"]

LATENT_KIND = "latent"
CODEC_KIND = "latent-codec"


def is_latent_prior(prior) -> bool:
    """Whether ``prior`` is a latent prior (``is_latent`` is true)."""
    return bool(getattr(prior, "is_latent", False))


def _module_of(fn) -> Optional[torch.nn.Module]:
    if isinstance(fn, torch.nn.Module):
        return fn
    owner = getattr(fn, "__self__", None)
    return owner if isinstance(owner, torch.nn.Module) else None


def _first_param(module: Optional[torch.nn.Module]):
    if module is None:
        return None
    for p in module.parameters():
        return p
    for b in module.buffers():
        if b.is_floating_point():
            return b
    return None


class LatentFlowPrior(FlowPrior):
    r"""A flow prior in a latent space with a decoder (and optionally an encoder).

    Args:
        velocity: ``v(z, t)`` on latents of shape ``(B, *latent_shape)``.
        decoder: callable ``z -> x``: latents to public images in :math:`[0, 1]` (an
            ``nn.Module``, a bound method of one, or any differentiable function).
        encoder: callable ``x -> z`` (public images to latents), or ``None``; needed for the
            blend initialisation with ``alpha > 0`` and ``trajectory="interpolate"``.
        image_size, channels: the decoded images' side and channels.
        latent_shape: ``(c, h, w)`` of one latent.
        hu_window, name, config: as :class:`~ctflow.priors.base.FlowPrior`.

    The model-space normalisation of :class:`FlowPrior` is the identity here (``scale = 1``,
    ``shift = 0``): the latent space *is* the model space, and ``to_model``/``from_model`` are
    the encoder and decoder. Module arguments are moved to the input's device and cast to
    their own parameter dtype on every call (results come back in the input's dtype).
    """

    is_latent = True

    def __init__(self, velocity: Callable, *, decoder: Callable,
                 encoder: Optional[Callable] = None, image_size: int, channels: int = 1,
                 latent_shape: Sequence[int], hu_window: Optional[Tuple[float, float]] = None,
                 name: str = "latent-prior", config: Optional[dict] = None):
        super().__init__(velocity, image_size=image_size, channels=channels, scale=1.0,
                         shift=0.0, hu_window=hu_window, name=name, config=config)
        if not callable(decoder):
            raise ValueError(f"LatentFlowPrior: decoder must be callable, got "
                             f"{type(decoder).__name__}")
        if encoder is not None and not callable(encoder):
            raise ValueError(f"LatentFlowPrior: encoder must be callable or None, got "
                             f"{type(encoder).__name__}")
        latent_shape = tuple(int(s) for s in latent_shape)
        if len(latent_shape) < 1 or min(latent_shape) < 1:
            raise ValueError(f"LatentFlowPrior: latent_shape must be positive sizes, got "
                             f"{latent_shape}")
        self.decoder = decoder
        self.encoder = encoder
        self.latent_shape = latent_shape

    # -- mapping between images and latents -----------------------------------------------
    @staticmethod
    def _apply(fn: Callable, x: torch.Tensor) -> torch.Tensor:
        p = _first_param(_module_of(fn))
        if p is None:
            return fn(x)
        if p.device != x.device:
            _module_of(fn).to(x.device)
        if p.is_floating_point() and p.dtype != x.dtype:
            return fn(x.to(p.dtype)).to(x.dtype)
        return fn(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents ``(B, *latent_shape)`` → public images ``(B, C, S, S)`` (not clipped).
        Tracks gradients only when ``z`` requires them (and grad mode is on)."""
        if tuple(z.shape[1:]) != self.latent_shape:
            raise ValueError(f"{self.name}: latents must have shape (B, "
                             f"{', '.join(map(str, self.latent_shape))}), got {tuple(z.shape)}")
        with torch.set_grad_enabled(torch.is_grad_enabled() and z.requires_grad):
            return self._apply(self.decoder, z)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Public images ``(B, C, S, S)`` → latents (no gradients)."""
        if self.encoder is None:
            raise ValueError(f"{self.name}: this latent prior has no encoder; initialise the "
                             f"solvers with alpha=0 (pure noise) instead of a blend")
        want = (self.channels, self.image_size, self.image_size)
        if tuple(x.shape[1:]) != want:
            raise ValueError(f"{self.name}: images must have shape (B, "
                             f"{', '.join(map(str, want))}), got {tuple(x.shape)}")
        with torch.no_grad():
            z = self._apply(self.encoder, x)
        if tuple(z.shape[1:]) != self.latent_shape:
            raise ValueError(f"{self.name}: the encoder returned shape {tuple(z.shape)}, "
                             f"expected (B, {', '.join(map(str, self.latent_shape))})")
        return z

    def to_model(self, x: torch.Tensor) -> torch.Tensor:
        """The encoder: public image → latent (the solvers' state space)."""
        return self.encode(x)

    def from_model(self, z: torch.Tensor) -> torch.Tensor:
        """The decoder: latent → public image (not clipped)."""
        return self.decode(z)

    # -- housekeeping -------------------------------------------------------------------------
    def _modules(self):
        mods = []
        for fn in (self.velocity, self.decoder, self.encoder):
            m = _module_of(fn) if fn is not None else None
            if m is not None and all(m is not k for k in mods):
                mods.append(m)
        return mods

    def to(self, device=None, dtype=None) -> "LatentFlowPrior":
        for m in self._modules():
            m.to(device=device, dtype=dtype)
        return self

    def eval(self) -> "LatentFlowPrior":
        for m in self._modules():
            m.eval()
            for p in m.parameters():
                p.requires_grad_(False)
        return self

    @torch.no_grad()
    def sample(self, n: int, *, steps: int = 50, method: str = "midpoint",
               generator: Optional[torch.Generator] = None, device=None,
               dtype=torch.float32) -> torch.Tensor:
        """``n`` decoded samples in ``[0, 1]`` (unclipped): latent noise integrated from
        ``t = 0`` to ``t = 1``, then decoded."""
        z = torch.randn((n, *self.latent_shape), generator=generator, dtype=dtype)
        z = z.to(device or "cpu")
        return self.decode(integrate(self.velocity, z, 0.0, 1.0, steps, method, grad=False))

    def __repr__(self) -> str:
        return (f"LatentFlowPrior(name={self.name!r}, image_size={self.image_size}, "
                f"channels={self.channels}, latent_shape={self.latent_shape}, "
                f"hu_window={self.hu_window})")


# ---------------------------------------------------------------------------------------------
# files
# ---------------------------------------------------------------------------------------------
def save_latent_prior(velocity: torch.nn.Module, codec, path_stem, *, image_size: int,
                      hu_window=None, name: Optional[str] = None, data: Optional[dict] = None,
                      training: Optional[dict] = None,
                      dtype: torch.dtype = torch.float32) -> Path:
    """Save a U-Net latent velocity and a :class:`~ctflow.flow.autoencoder.LatentCodec` as one
    latent prior ``<path_stem>.safetensors`` + ``<path_stem>.json`` (``"kind": "latent"``).
    Returns the JSON path."""
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
    cfg = dict(getattr(velocity, "config", None) or {})
    if not cfg:
        raise ValueError("save_latent_prior: the velocity module has no .config")
    lat = codec.autoencoder.latent_shape(int(image_size))
    if cfg.get("channels") != lat[0]:
        raise ValueError(f"save_latent_prior: the velocity has {cfg.get('channels')} channels, "
                         f"the codec's latents {lat[0]}")

    def cast(v):
        return v.detach().to(dtype) if v.is_floating_point() else v.detach()

    tensors = {f"flow.{k}": cast(v) for k, v in velocity.state_dict().items()}
    tensors.update({f"codec.{k}": cast(v) for k, v in codec.state_dict().items()})
    meta = {
        "format": PRIOR_FORMAT, "format_version": FORMAT_VERSION, "kind": LATENT_KIND,
        "name": name or Path(path_stem).name, "model": cfg, "autoencoder": codec.config,
        "image_size": int(image_size), "channels": int(codec.config["channels"]),
        "latent_shape": list(lat), "latent_mean": codec.mean.tolist(),
        "latent_std": codec.std.tolist(), "scale": 1.0, "shift": 0.0,
        "hu_window": list(hu_window) if hu_window is not None else None,
        "time_convention": "t=0 noise N(0, I), t=1 data (normalised latent codes); "
                           "z_t = t z1 + (1 - t) z0; images x = decoder(z1)",
        "dtype": str(dtype).replace("torch.", ""),
        "data": data or {}, "training": training or {},
    }
    return write_checkpoint(tensors, meta, path_stem)


def latent_prior_from_checkpoint(tensors: Dict[str, torch.Tensor], meta: dict,
                                 json_path: Path) -> LatentFlowPrior:
    """Build a :class:`LatentFlowPrior` from the tensors and description that
    :func:`ctflow.priors.checkpoint_io.read_checkpoint` returned for a ``"kind": "latent"`` file
    (shapes checked against the architecture configs; errors name the file)."""
    if meta.get("kind") == CODEC_KIND:
        raise CheckpointError(f"{json_path}: this is an autoencoder codec (kind "
                              f"{CODEC_KIND!r}), not a prior; bundle it with its latent flow "
                              f"(python -m ctflow.training.autoencoder bundle)")
    for key in ("model", "autoencoder", "image_size", "latent_shape"):
        if key not in meta:
            raise CheckpointError(f"{json_path}: latent prior description lacks {key!r}")
    try:
        velocity = build_velocity(meta["model"])
        codec = LatentCodec(AutoEncoder.from_config(meta["autoencoder"]))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{json_path}: invalid architecture config ({e})") from None
    where = json_path.with_name(meta.get("weights", json_path.stem))
    flow_state = {k[5:]: v for k, v in tensors.items() if k.startswith("flow.")}
    codec_state = {k[6:]: v for k, v in tensors.items() if k.startswith("codec.")}
    other = sorted(k for k in tensors if not k.startswith(("flow.", "codec.")))
    if other:
        raise CheckpointError(f"{where}: unexpected tensors {other[:5]} in a latent prior")
    check_state(velocity, flow_state, where)
    check_state(codec, codec_state, where)
    velocity.load_state_dict({k: v.float() for k, v in flow_state.items()})
    codec.load_state_dict({k: v.float() for k, v in codec_state.items()})
    image_size = int(meta["image_size"])
    lat = tuple(int(s) for s in meta["latent_shape"])
    if codec.autoencoder.latent_shape(image_size) != lat:
        raise CheckpointError(f"{json_path}: latent_shape {list(lat)} does not match the "
                              f"autoencoder's {list(codec.autoencoder.latent_shape(image_size))}"
                              f" at image_size {image_size}")
    prior = LatentFlowPrior(velocity, decoder=codec.decode, encoder=codec.encode,
                            image_size=image_size, channels=int(codec.config["channels"]),
                            latent_shape=lat, hu_window=meta.get("hu_window"),
                            name=str(meta.get("name", json_path.stem)), config=meta)
    prior.codec = codec
    return prior.eval()
