"""Synthesis configuration: one frozen dataclass, ``None`` = "the method's / model family's default".

Every number of ALGORITHMS.md §1 is a field here, tagged [paper] (stated by the method's paper or
public code) or [default] (our choice where nothing was stated). :meth:`SynthConfig.resolve`
fills the ``None`` fields for a method and model family; the resolved config is what runs and
what is recorded in the calibration set's metadata.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from sardfq_export.core.errors import UserInputError
from sardfq_export.models.families import FAMILIES

# Adam learning rate and APA weight α per model family: models.families (Family.synth_lr / apa_weight).
FAMILY_LR = {name: fam.synth_lr for name, fam in FAMILIES.items()}
FAMILY_APA_WEIGHT = {name: fam.apa_weight for name, fam in FAMILIES.items()}
# Iterations per method [paper]: PSAQ-ViT 2 rounds x 500, SARDFQ 1000 (same schedule [default]).
METHOD_ITERS = {"noise": 0, "psaq": 1000, "sardfq": 1000}
# Patch-similarity-entropy weight per method: PSAQ-ViT's loss has it [paper], SARDFQ's does not.
METHOD_PSE_WEIGHT = {"noise": 0.0, "psaq": 1.0, "sardfq": 0.0}


@dataclass(frozen=True)
class SynthConfig:
    """How to synthesize one calibration set. ``None`` fields take the method/family default."""

    method: str = "sardfq"  # registry name: noise | psaq | sardfq
    num_images: int = 32  # images in the set
    batch_size: int = 32  # images optimized together [paper: B = 32, the whole set]
    seed: int = 0  # every random draw derives from (seed, image index, stream)
    iters: int | None = None  # total Adam iterations per batch (None: METHOD_ITERS)

    # Optimizer, schedule, augmentation, clipping: PSAQ-ViT's, reused by SARDFQ [paper / default].
    lr: float | None = None  # Adam lr (None: FAMILY_LR)
    betas: tuple[float, float] = (0.5, 0.9)  # [paper]
    rounds: int = 2  # lr schedule restarts per round, optimizer state kept [paper]
    warmup_frac: float = 0.2  # linear warm-up share of each round [paper: 100 of 500 steps]
    roll_px: tuple[float, ...] = (15.0, 30.0)  # max |roll| per round at 224 px, scaled by H/224 [paper]
    roll_same_offset: bool = True  # one offset for both axes (ALGORITHMS.md); False: independent draws
    flip_p: float = 0.5  # horizontal flip probability [paper]
    clip: bool = True  # clamp each channel to the range of pixel values [0, 1] after every step
    # Optimize the pixels at this fraction of the model's input side and upsample them (bilinear)
    # to it at every step, so the images cannot hold detail finer than that grid (None: the model's
    # own default, ``extra["synthesis_image_scale"]``, else 1.0: the paper's full-resolution pixels
    # [default]). Why: synthetic sets are textures (28% of their energy above 1/8 cycle per pixel,
    # real Fashion-MNIST images 0.3%; docs/dinov2-accuracy.md).
    image_scale: float | None = None
    # Optimize one grey channel and give every input channel the same pixel value (each through its
    # own mean/std), for models whose inputs are grey images replicated to three channels (None: the
    # model's own default, ``extra["synthesis_grey"]``, else False: one value per channel [paper]).
    # A fact about the model's input, like its size and mean/std, not data: the DINOv2 benchmark
    # model's head was trained on Fashion-MNIST replicated to 3 channels (its model card).
    grey: bool | None = None
    # Optimize only the inside of a band of this fraction of the side on each edge; the band is one
    # flat grey per image, drawn uniformly in pixel space (None: the model's own default,
    # ``extra["synthesis_frame"]``, else 0: off, the paper's edge-to-edge images [default]). Why: the
    # model's loss then shapes an object on a plain surround, the layout of photos, which moves a real
    # ViT's deep-block activations toward real images' where texture to the edges does not
    # (core.frame; docs/dinov2-accuracy.md).
    frame: float | None = None
    # Draw each image's four band widths (top, bottom, left, right) uniformly in frame·[1 − j, 1 + j]
    # from its seed, so the object's window varies in size, aspect and place from image to image
    # (0: every image has the same centred window [default]). Photos frame their objects that way.
    frame_jitter: float = 0.0

    # Loss weights and terms.
    ce_weight: float = 1.0  # (soft) cross-entropy weight [paper]
    pse_weight: float | None = None  # patch-similarity entropy (None: METHOD_PSE_WEIGHT)
    kde_bandwidth: float = 0.01  # Gaussian-kernel bandwidth of the PSE density [paper]
    kde_points: int = 10  # grid points over the batch's similarity range [paper]
    kde_eps: float = 1e-4  # inside the log of -p log p [paper]
    tv_weight: float = 0.05  # weight of |TV - tau| [paper]
    tv_tau: tuple[float, float] = (2500.0, 3000.0)  # tau ~ U(.) for tv_tau_ref elements [paper]
    tv_tau_ref: int = 32 * 3 * 224 * 224  # B*C*H*W that tv_tau is stated for; tau scales with sqrt [default]

    # SARDFQ components (ablation switches) and their parameters.
    apa: bool = True  # Attention Priors Alignment
    msr: bool = True  # Multi-Semantic Reinforcement
    soft_labels: bool = True  # Soft-Label Learning (off: one-hot cross-entropy)
    apa_weight: float | None = None  # alpha (None: FAMILY_APA_WEIGHT)
    apa_start: float = 0.5  # APA on blocks l >= apa_start * L, l 1-based, inclusive [default]
    apa_components: int = 5  # K ~ U{1..K_APA} Gaussians per prior [paper: 5 is best]
    apa_std: tuple[float, float] = (1.0, 4.0)  # isotropic std in patches on a 14-side grid, scaled [default]
    apa_dirichlet: float = 1.0  # mixing weights ~ Dirichlet(this) [default]
    msr_regions: int = 4  # m ~ U{1..K_MSR} cells of the 2x2 half-size grid [paper K_MSR=4; grid default]
    soft_logit: tuple[float, float] = (5.0, 10.0)  # relevant-class logits ~ U(.) [paper]

    bf16: bool = False  # bf16 autocast of the teacher forward (losses stay fp32)

    def resolve(self, family: str) -> SynthConfig:
        """A copy with every ``None`` filled for ``family`` and the values checked."""
        from sardfq_export.synthesis.methods import METHODS

        if self.method not in METHODS:
            raise UserInputError(
                f"unknown synthesis method {self.method!r}: choose one of {', '.join(METHODS)}"
            )
        if family not in FAMILY_LR:
            raise UserInputError(f"no synthesis defaults for model family {family!r}")
        cfg = dataclasses.replace(
            self,
            iters=METHOD_ITERS[self.method] if self.iters is None else self.iters,
            lr=FAMILY_LR[family] if self.lr is None else self.lr,
            pse_weight=METHOD_PSE_WEIGHT[self.method] if self.pse_weight is None else self.pse_weight,
            apa_weight=FAMILY_APA_WEIGHT[family] if self.apa_weight is None else self.apa_weight,
            image_scale=1.0 if self.image_scale is None else self.image_scale,
            grey=bool(self.grey),
            frame=0.0 if self.frame is None else self.frame,
        )
        if cfg.num_images < 1 or cfg.batch_size < 1:
            raise UserInputError("num_images and batch_size must be at least 1")
        if cfg.iters < 0 or cfg.rounds < 1 or (cfg.iters and cfg.iters < cfg.rounds):
            raise UserInputError(f"iters ({cfg.iters}) must be 0 or at least rounds ({cfg.rounds})")
        if not 0.0 < cfg.image_scale <= 1.0:
            raise UserInputError(f"image_scale must be in (0, 1], got {cfg.image_scale}")
        if not 0.0 <= cfg.frame < 0.5:
            raise UserInputError(
                f"frame must be a fraction of the side in [0, 0.5) (0: off), got {cfg.frame}"
            )
        if not 0.0 <= cfg.frame_jitter <= 1.0:
            raise UserInputError(f"frame_jitter must be in [0, 1] (0: off), got {cfg.frame_jitter}")
        if cfg.frame_jitter and not 0.0 < cfg.frame * (1 + cfg.frame_jitter) < 0.5:
            raise UserInputError(
                f"frame_jitter needs a frame whose widest band, frame·(1 + jitter) = "
                f"{cfg.frame * (1 + cfg.frame_jitter):g}, is in (0, 0.5) of the side"
            )
        if len(cfg.roll_px) < cfg.rounds:
            raise UserInputError(f"roll_px needs one value per round ({cfg.rounds})")
        return cfg

    def with_model_defaults(self, extra: dict) -> SynthConfig:
        """A copy whose unset ``iters`` / ``image_scale`` / ``grey`` / ``frame`` take a model's own
        defaults (its ``LoadedModel.extra``: ``synthesis_iters``, ``synthesis_image_scale``,
        ``synthesis_grey``, ``synthesis_frame``) where it has them."""
        return dataclasses.replace(
            self,
            iters=extra.get("synthesis_iters") if self.iters is None else self.iters,
            image_scale=extra.get("synthesis_image_scale") if self.image_scale is None else self.image_scale,
            grey=extra.get("synthesis_grey") if self.grey is None else self.grey,
            frame=extra.get("synthesis_frame") if self.frame is None else self.frame,
        )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> SynthConfig:
        names = {f.name: f for f in dataclasses.fields(cls)}
        unknown = set(d) - set(names)
        if unknown:
            raise UserInputError(f"unknown synthesis settings: {sorted(unknown)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})
