r"""Stable Diffusion 3 (diffusers) as a ctflow latent prior: :func:`from_diffusers`.

**Time and sign conventions.** diffusers' SD3 (``FlowMatchEulerDiscreteScheduler``) runs a
noise level :math:`\sigma` from 1 (noise) to 0 (data) on the path
:math:`x_\sigma = (1 - \sigma)\,x_\text{data} + \sigma\,\varepsilon`, calls the transformer
with ``timestep`` :math:`= 1000\,\sigma` (``num_train_timesteps`` :math:`\cdot\,\sigma`), and
the transformer predicts
:math:`u = \varepsilon - x_\text{data} = \mathrm dx_\sigma/\mathrm d\sigma`;
a scheduler step is :math:`x_{\sigma'} = x_\sigma + (\sigma' - \sigma)\,u`. ctflow runs
:math:`t` from 0 (noise) to 1 (data) on :math:`x_t = t\,x_1 + (1 - t)\,x_0`, so

.. math:: t = 1 - \sigma, \qquad v(x, t) = \frac{\mathrm dx}{\mathrm dt}
          = -\frac{\mathrm dx}{\mathrm d\sigma} = -u\big(x, \text{timestep} = 1000\,(1 - t)\big),

and one ctflow Euler step from :math:`t` to :math:`t'` equals one scheduler step from
:math:`\sigma = 1 - t` to :math:`\sigma' = 1 - t'` (:func:`sigma_to_t`, :func:`t_to_sigma`,
:func:`velocity_from_model_output`, :func:`model_output_from_velocity`). The scheduler's
time shift (``shift = 3`` for SD3) only chooses the grid of :math:`\sigma` values; the
model's parametrisation does not depend on it, so ctflow's own grids (MS-Flow nodes, D-Flow
steps) apply unchanged.

**Latents.** The VAE's latents are normalised as in the SD3 pipelines,
:math:`z = (\mathrm{VAE.encode}(x) - \text{shift\_factor})\cdot\text{scaling\_factor}` and
:math:`x = \mathrm{VAE.decode}(z/\text{scaling\_factor} + \text{shift\_factor})`; images are
mapped from ctflow's :math:`[0, 1]` to the VAE's :math:`[-1, 1]`. With ``channels=1``
(CT) a grey image is repeated over the VAE's RGB channels when encoding and the decoded RGB
channels are averaged.

**Conditioning.** Prompt embeddings are computed once: given directly
(``prompt_embeds``/``pooled_prompt_embeds``), or from ``prompt`` with the pipeline's text
encoders (they must be in the local folder; they are freed afterwards), or — when neither is
given — zeros (a cheap stand-in for the unconditional model; for SD3's real unconditional
embedding pass ``prompt=""``). ``guidance_scale > 1`` applies classifier-free guidance,
:math:`u = u_\text{neg} + g\,(u_\text{cond} - u_\text{neg})`, at twice the cost per evaluation.

Nothing is downloaded: components load from a local folder (``local_files_only=True``) or
are passed in as objects.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Tuple, Union

import torch
from torch import nn

from ctflow.priors.latent import LatentFlowPrior

__all__ = ["from_diffusers", "SD3Velocity", "SD3Codec", "sigma_to_t", "t_to_sigma",
           "velocity_from_model_output", "model_output_from_velocity"]


def sigma_to_t(sigma):
    """diffusers' noise level :math:`\\sigma` (1 noise → 0 data) to ctflow time
    :math:`t = 1 - \\sigma` (0 noise → 1 data)."""
    return 1.0 - sigma


def t_to_sigma(t):
    """ctflow time :math:`t` to diffusers' noise level :math:`\\sigma = 1 - t`."""
    return 1.0 - t


def velocity_from_model_output(u: torch.Tensor) -> torch.Tensor:
    """SD3's prediction :math:`u = \\varepsilon - x_\\text{data}` to ctflow's velocity
    :math:`v = x_\\text{data} - \\varepsilon = -u`."""
    return -u


def model_output_from_velocity(v: torch.Tensor) -> torch.Tensor:
    """ctflow's velocity :math:`v` to SD3's prediction :math:`u = -v`."""
    return -v


class SD3Velocity(nn.Module):
    r"""An SD3 transformer as a ctflow velocity field :math:`v(z, t) = -u(z, 1000(1-t))`.

    Args:
        transformer: a diffusers ``SD3Transformer2DModel``.
        prompt_embeds, pooled_prompt_embeds: conditioning ``(1, L, D)`` and ``(1, P)``.
        negative_prompt_embeds, negative_pooled_prompt_embeds: the unconditional branch for
            classifier-free guidance (required when ``guidance_scale != 1``).
        guidance_scale: :math:`g`.
        num_train_timesteps: the scheduler's timestep scale (1000 for SD3).
    """

    def __init__(self, transformer: nn.Module, prompt_embeds: torch.Tensor,
                 pooled_prompt_embeds: torch.Tensor, *,
                 negative_prompt_embeds: Optional[torch.Tensor] = None,
                 negative_pooled_prompt_embeds: Optional[torch.Tensor] = None,
                 guidance_scale: float = 1.0, num_train_timesteps: int = 1000):
        super().__init__()
        self.transformer = transformer
        self.guidance_scale = float(guidance_scale)
        self.num_train_timesteps = int(num_train_timesteps)
        if prompt_embeds.ndim != 3 or prompt_embeds.shape[0] != 1:
            raise ValueError(f"prompt_embeds must have shape (1, L, D), got "
                             f"{tuple(prompt_embeds.shape)}")
        if pooled_prompt_embeds.ndim != 2 or pooled_prompt_embeds.shape[0] != 1:
            raise ValueError(f"pooled_prompt_embeds must have shape (1, P), got "
                             f"{tuple(pooled_prompt_embeds.shape)}")
        self.register_buffer("prompt_embeds", prompt_embeds.detach().clone())
        self.register_buffer("pooled_prompt_embeds", pooled_prompt_embeds.detach().clone())
        if self.guidance_scale != 1.0:
            if negative_prompt_embeds is None or negative_pooled_prompt_embeds is None:
                raise ValueError("guidance_scale != 1 needs negative_prompt_embeds and "
                                 "negative_pooled_prompt_embeds (or a prompt and text encoders)")
            if (negative_prompt_embeds.shape != prompt_embeds.shape
                    or negative_pooled_prompt_embeds.shape != pooled_prompt_embeds.shape):
                raise ValueError("negative prompt embeddings must have the shapes of the "
                                 "prompt embeddings")
            self.register_buffer("negative_prompt_embeds", negative_prompt_embeds.detach().clone())
            self.register_buffer("negative_pooled_prompt_embeds",
                                 negative_pooled_prompt_embeds.detach().clone())

    def model_output(self, z: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """The transformer's prediction :math:`u(z, \\sigma)` (with guidance if set)."""
        B = z.shape[0]
        timestep = (sigma * self.num_train_timesteps).to(z.dtype)
        emb = self.prompt_embeds.to(z.dtype).expand(B, -1, -1)
        pooled = self.pooled_prompt_embeds.to(z.dtype).expand(B, -1)
        if self.guidance_scale != 1.0:
            emb = torch.cat([self.negative_prompt_embeds.to(z.dtype).expand(B, -1, -1), emb])
            pooled = torch.cat([self.negative_pooled_prompt_embeds.to(z.dtype).expand(B, -1),
                                pooled])
            zz, ts = torch.cat([z, z]), torch.cat([timestep, timestep])
        else:
            zz, ts = z, timestep
        u = self.transformer(hidden_states=zz, timestep=ts, encoder_hidden_states=emb,
                             pooled_projections=pooled, return_dict=False)[0]
        if self.guidance_scale != 1.0:
            u_neg, u_cond = u.chunk(2)
            u = u_neg + self.guidance_scale * (u_cond - u_neg)
        return u

    def forward(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, device=z.device)
        if t.ndim == 0:
            t = t.expand(z.shape[0])
        return velocity_from_model_output(self.model_output(z, t_to_sigma(t.to(z.dtype))))


class SD3Codec(nn.Module):
    r"""The SD3 VAE between ctflow images (:math:`[0,1]`, ``channels`` channels) and
    normalised latents :math:`z = (\mathrm{enc}(x) - \text{shift})\cdot\text{scale}`."""

    def __init__(self, vae: nn.Module, *, channels: int = 1):
        super().__init__()
        self.vae = vae
        cfg = vae.config
        self.vae_channels = int(cfg.in_channels)
        self.channels = int(channels)
        if self.channels not in (1, self.vae_channels):
            raise ValueError(f"channels must be 1 (grey, repeated over the VAE's channels) or "
                             f"the VAE's {self.vae_channels}, got {channels}")
        self.scaling_factor = float(cfg.scaling_factor)
        self.shift_factor = float(getattr(cfg, "shift_factor", None) or 0.0)
        self.factor = 2 ** (len(cfg.block_out_channels) - 1)
        self.latent_channels = int(cfg.latent_channels)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Public images → normalised latents (the posterior mean; deterministic)."""
        if self.channels == 1 and self.vae_channels != 1:
            x = x.expand(-1, self.vae_channels, -1, -1)
        z = self.vae.encode(2.0 * x - 1.0).latent_dist.mode()
        return (z - self.shift_factor) * self.scaling_factor

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Normalised latents → public images in :math:`[0, 1]` (not clipped)."""
        img = self.vae.decode(z / self.scaling_factor + self.shift_factor,
                              return_dict=False)[0]
        if self.channels == 1 and img.shape[1] != 1:
            img = img.mean(dim=1, keepdim=True)
        return 0.5 * (img + 1.0)


def _load(cls, path: Path, subfolder: str, what: str, dtype):
    folder = path / subfolder
    if not folder.is_dir():
        raise FileNotFoundError(f"from_diffusers: no {what} folder {folder} (expected the "
                                f"diffusers layout <path>/{subfolder}/); pass {what}=... instead")
    kw = {"local_files_only": True}
    if dtype is not None and what != "scheduler":
        kw["torch_dtype"] = dtype
    if what == "scheduler":
        return cls.from_pretrained(str(path), subfolder=subfolder, local_files_only=True)
    return cls.from_pretrained(str(path), subfolder=subfolder, **kw)


def _encode_prompt(path: Optional[Path], transformer, vae, scheduler, prompt: str,
                   negative_prompt: str, guidance: bool, device, max_sequence_length: int):
    if path is None:
        raise ValueError("from_diffusers: prompt=... needs the text encoders, so give the "
                         "local pipeline folder as path (or pass prompt_embeds=...)")
    from diffusers import StableDiffusion3Pipeline
    pipe = StableDiffusion3Pipeline.from_pretrained(str(path), transformer=transformer, vae=vae,
                                                    scheduler=scheduler, local_files_only=True)
    pipe.to(device or "cpu")
    with torch.no_grad():
        pe, npe, ppe, nppe = pipe.encode_prompt(
            prompt=prompt, prompt_2=prompt, prompt_3=prompt, device=device or "cpu",
            do_classifier_free_guidance=guidance, negative_prompt=negative_prompt,
            negative_prompt_2=negative_prompt, negative_prompt_3=negative_prompt,
            max_sequence_length=max_sequence_length)
    del pipe
    return pe, ppe, npe, nppe


def from_diffusers(path: Union[str, os.PathLike, None] = None, *, transformer=None, vae=None,
                   scheduler=None, prompt: Optional[str] = None, negative_prompt: str = "",
                   prompt_embeds: Optional[torch.Tensor] = None,
                   pooled_prompt_embeds: Optional[torch.Tensor] = None,
                   negative_prompt_embeds: Optional[torch.Tensor] = None,
                   negative_pooled_prompt_embeds: Optional[torch.Tensor] = None,
                   guidance_scale: float = 1.0, zero_sequence_length: int = 77,
                   max_sequence_length: int = 256, image_size: Optional[int] = None,
                   channels: int = 1, hu_window: Optional[Tuple[float, float]] = None,
                   dtype: Optional[torch.dtype] = None, device=None,
                   name: str = "sd3") -> LatentFlowPrior:
    r"""A Stable Diffusion 3 model (diffusers) as a ctflow :class:`LatentFlowPrior`.

    Args:
        path: a local diffusers SD3 folder (``transformer/``, ``vae/``, ``scheduler/`` and,
            for ``prompt``, the text encoders and tokenizers). Nothing is downloaded.
        transformer, vae, scheduler: components given as objects (override ``path``); the
            scheduler only supplies ``num_train_timesteps`` (1000 without one).
        prompt, negative_prompt: text encoded once with the pipeline's text encoders.
        prompt_embeds, pooled_prompt_embeds: precomputed conditioning ``(1, L, D)``,
            ``(1, P)``; the negative ones for guidance.
        guidance_scale: classifier-free guidance scale :math:`g` (1 = none).
        zero_sequence_length: token count of the zero embeddings used when no conditioning
            is given.
        image_size: decoded image side (default: the transformer's ``sample_size`` times the
            VAE's downsampling factor).
        channels: 1 (grey images, e.g. CT) or the VAE's channels.
        hu_window: recorded on the prior for CT use.
        dtype, device: where and in which dtype the components run.

    Returns:
        a :class:`~ctflow.priors.latent.LatentFlowPrior` (eval mode, no parameter gradients)
        with velocity :class:`SD3Velocity` (ctflow's time convention, see the module
        docstring), decoder/encoder :class:`SD3Codec`, ``latent_shape =
        (latent_channels, image_size/f, image_size/f)``.
    """
    try:
        import diffusers
    except ImportError as exc:
        raise ImportError("from_diffusers needs the diffusers package: pip install "
                          "'ctflow[diffusers]' (or pip install diffusers)") from exc
    p = None
    if path is not None:
        p = Path(path)
        if not p.is_dir():
            raise FileNotFoundError(f"from_diffusers: model folder not found: {p}")
    if transformer is None:
        if p is None:
            raise ValueError("from_diffusers: give a local model folder path or transformer=")
        transformer = _load(diffusers.SD3Transformer2DModel, p, "transformer", "transformer",
                            dtype)
    if vae is None:
        if p is None:
            raise ValueError("from_diffusers: give a local model folder path or vae=")
        vae = _load(diffusers.AutoencoderKL, p, "vae", "vae", dtype)
    if scheduler is None and p is not None and (p / "scheduler").is_dir():
        scheduler = _load(diffusers.FlowMatchEulerDiscreteScheduler, p, "scheduler",
                          "scheduler", None)
    if scheduler is not None and not isinstance(scheduler,
                                                diffusers.FlowMatchEulerDiscreteScheduler):
        raise ValueError(f"from_diffusers: expected a FlowMatchEulerDiscreteScheduler (SD3's "
                         f"flow-matching scheduler), got {type(scheduler).__name__}")
    n_train = int(scheduler.config.num_train_timesteps) if scheduler is not None else 1000
    if dtype is not None:
        transformer.to(dtype=dtype)
        vae.to(dtype=dtype)
    if device is not None:
        transformer.to(device)
        vae.to(device)
    tcfg = transformer.config
    codec = SD3Codec(vae, channels=channels)
    if codec.latent_channels != int(tcfg.in_channels):
        raise ValueError(f"from_diffusers: the VAE has {codec.latent_channels} latent channels "
                         f"but the transformer takes {tcfg.in_channels}")
    if image_size is None:
        image_size = int(tcfg.sample_size) * codec.factor
    unit = codec.factor * int(tcfg.patch_size)
    if image_size % unit:
        raise ValueError(f"from_diffusers: image_size={image_size} must be divisible by "
                         f"{unit} (VAE factor {codec.factor} × patch size {tcfg.patch_size})")
    guidance = float(guidance_scale) != 1.0
    if prompt_embeds is None and prompt is not None:
        prompt_embeds, pooled_prompt_embeds, negative_prompt_embeds, \
            negative_pooled_prompt_embeds = _encode_prompt(p, transformer, vae, scheduler,
                                                           prompt, negative_prompt, guidance,
                                                           device, max_sequence_length)
    ref = next(transformer.parameters())
    if prompt_embeds is None:
        prompt_embeds = torch.zeros(1, int(zero_sequence_length), int(tcfg.joint_attention_dim),
                                    dtype=ref.dtype, device=ref.device)
        pooled_prompt_embeds = torch.zeros(1, int(tcfg.pooled_projection_dim), dtype=ref.dtype,
                                           device=ref.device)
        if guidance and negative_prompt_embeds is None:
            raise ValueError("from_diffusers: guidance_scale != 1 needs a prompt (with text "
                             "encoders) or prompt/negative prompt embeddings")
    elif pooled_prompt_embeds is None:
        raise ValueError("from_diffusers: prompt_embeds given without pooled_prompt_embeds")
    velocity = SD3Velocity(transformer, prompt_embeds.to(ref.device),
                           pooled_prompt_embeds.to(ref.device),
                           negative_prompt_embeds=None if negative_prompt_embeds is None
                           else negative_prompt_embeds.to(ref.device),
                           negative_pooled_prompt_embeds=None
                           if negative_pooled_prompt_embeds is None
                           else negative_pooled_prompt_embeds.to(ref.device),
                           guidance_scale=guidance_scale, num_train_timesteps=n_train)
    s = image_size // codec.factor
    config = {"kind": "diffusers-sd3", "path": None if p is None else str(p),
              "transformer": dict(tcfg), "vae_scaling_factor": codec.scaling_factor,
              "vae_shift_factor": codec.shift_factor, "guidance_scale": float(guidance_scale),
              "num_train_timesteps": n_train, "prompt": prompt,
              "diffusers_version": diffusers.__version__}
    prior = LatentFlowPrior(velocity, decoder=codec.decode, encoder=codec.encode,
                            image_size=image_size, channels=channels,
                            latent_shape=(codec.latent_channels, s, s), hu_window=hu_window,
                            name=name, config=config)
    prior.codec = codec
    prior.scheduler = scheduler
    return prior.eval()
