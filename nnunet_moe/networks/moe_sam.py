"""MoE-SAM: SAM ViT-B with adapters, MoE feature enhancement and learned prompts, for nnU-Net 2D patches.

Paper: Li, Wu, Gu, Xu, Chen, Cai, Bu, "MoE-SAM: Enhancing SAM for Medical Image Segmentation
with Mixture-of-Experts". Built from the ``segment-anything`` package's own
classes (``ImageEncoderViT``, ``PromptEncoder``, ``MaskDecoder``, ``TwoWayTransformer``) with the
ViT-B settings of ``build_sam_vit_b``, at a square input size ``S`` instead of 1024.

Forward, for nnU-Net's ``(B, C_in, h, w)`` patches -> ``(B, C, h, w)`` logits:

1. channel bridge: SAM's RGB channel ``i`` is input channel ``i mod C_in`` (1 channel: grey
   replicated; 2: (c0, c1, c0); 3: as is); more than 3 channels are refused.
2. intensities: nnU-Net's normalised values ``z`` are taken as SAM's *normalised* input. SAM
   normalises an RGB value ``p`` as ``(p - pixel_mean) / pixel_std``; ``z`` is what that gives
   for ``p = pixel_mean + pixel_std * z``: z-scored data has SAM-normalised statistics (mean 0,
   std 1 per channel). A per-patch rescale to 0-255 would make one voxel look different in
   different sliding windows.
3. bilinear resize to ``S x S`` (the paper resizes every image to 256², 224² on Synapse).
4. SAM's image encoder, unchanged; forward hooks give every block MoE-SAM's adapters
   (:mod:`nnunet_moe.layers.adapters`) and record the 12 block outputs.
5. embedding + MoE feature enhancement of the 12 block outputs
   (:mod:`nnunet_moe.layers.feature_enhancement`).
6. the prompt generator (:mod:`nnunet_moe.layers.prompt_generator`) turns the enhanced embedding
   into one sparse prompt token per image; the dense prompt is SAM's no-mask embedding and the
   positional encoding SAM's dense PE (no user points, boxes or masks).
7. SAM's mask decoder with ``num_multimask_outputs = C - 1``, i.e. ``C`` mask tokens, one per
   class including background; all ``C`` masks of ``predict_masks`` are the class logits
   (``S/4`` resolution), resized bilinearly to ``h x w``. ``predict_masks`` pairs one image with
   all prompts of a call, so it is called once per image.

Multi-class output: one decoder pass with ``C`` mask tokens is SAM's multimask mechanism, costs
one decoder pass per image whatever ``C``, and gives competing logits for nnU-Net's softmax CE
and Dice. The alternative, one learned prompt per class with a single-mask decoder, keeps SAM's
"one prompt -> one mask" semantics and all four pretrained mask tokens' roles, but runs the
decoder ``C`` times and its per-class masks do not compete. Checkpoint tokens for ``C`` classes
vs SAM's 4: :mod:`nnunet_moe.pretrained.sam_weights`.

Trainable: adapters, MoE block, prompt generator, mask decoder except its IoU head (unused without
SAM's mask selection; frozen so every trainable parameter gets a gradient, as DDP requires). Frozen:
the image encoder's SAM weights (``freeze_encoder=True``, the paper's setting with pretrained weights;
the from-scratch trainers train them too) and the prompt encoder (only its no-mask embedding and fixed
positional encoding are used).

Parameters (segment-anything 1.0, by instantiation; tests/test_moe_sam_network.py): SAM ViT-B
93,735,472 (encoder 89,670,912 at 1024², 86,672,640 at 256²). Added at ``S = 256``: adapters
7,100,928 (295,872 = 2 x 768 x 192 + 192 + 768 per adapter), MoE block 22,047,240 (22,042,628 for
router, experts, attention and neck, plus the noise projection 3,076 and the pre-attention LayerNorm
1,536), prompt generator 8,976.
For 3 classes (hippocampus) the decoder has 3 mask tokens (3,918,019 parameters, one token fewer
than SAM's 4) and 32,942,808 parameters are trainable.
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, TwoWayTransformer
from torch import nn

from nnunet_moe.layers.adapters import attach_block_adapters
from nnunet_moe.layers.feature_enhancement import MoEFeatureEnhancement
from nnunet_moe.layers.prompt_generator import PromptEmbeddingGenerator

__all__ = ["MoESAM", "ENCODERS", "parameter_report", "format_parameter_report", "check_image_size"]

# "vit_b": build_sam_vit_b's settings (segment_anything/build_sam.py). "tiny": the same layout (12 blocks, global
# attention in blocks 2/5/8/11, windows of 14) at width 192, for CPU tests; no SAM checkpoint exists for it.
ENCODERS = {
    "vit_b": {"embed_dim": 768, "depth": 12, "num_heads": 12, "global_attn_indexes": (2, 5, 8, 11), "window_size": 14},
    "tiny": {"embed_dim": 192, "depth": 12, "num_heads": 3, "global_attn_indexes": (2, 5, 8, 11), "window_size": 8},
}
PATCH = 16
PROMPT_DIM = 256
MAX_INPUT_CHANNELS = 3


def check_image_size(image_size) -> int:
    if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < PATCH \
            or image_size % PATCH:
        raise ValueError(f"MoE-SAM input size S={image_size!r} must be a positive multiple of SAM's patch size "
                         f"{PATCH} (e.g. 256 as in the paper, 224 on Synapse, 128)")
    return image_size


class MoESAM(nn.Module):
    """``(B, C_in, h, w)`` -> ``(B, num_classes, h, w)`` logits (a one-element list with deep supervision on).

    ``adapters`` / ``moe`` / ``prompt_generator`` switch the paper's three additions (ablations,
    equivalence tests); ``routing``: ``"layers"`` (paper) or ``"tokens"`` (the authors' code);
    ``encoder``: a key of :data:`ENCODERS` (``"vit_b"``: SAM ViT-B; ``"tiny"``: width 192, CPU tests).
    ``freeze_encoder``: SAM's encoder weights frozen (only the adapters train), as the paper does with
    pretrained weights; ``False`` trains the whole encoder (from scratch a frozen random encoder is a
    fixed random feature extractor).
    The MoE experts are ``4 x`` the encoder width wide (ViT-B: 768 -> 3072 -> 768).
    """

    def __init__(self, num_input_channels: int, num_classes: int, image_size: int = 256, adapters: bool = True,
                 moe: bool = True, prompt_generator: bool = True, routing: str = "layers",
                 deep_supervision: bool = False, encoder: str = "vit_b", freeze_encoder: bool = True):
        super().__init__()
        if encoder not in ENCODERS:
            raise ValueError(f"MoE-SAM encoder must be one of {sorted(ENCODERS)}, got {encoder!r}")
        vit = ENCODERS[encoder]
        self.encoder_name = encoder
        if not 1 <= num_input_channels <= MAX_INPUT_CHANNELS:
            raise ValueError(
                f"MoE-SAM takes 1 to {MAX_INPUT_CHANNELS} input channels (mapped onto SAM's RGB input: RGB channel i "
                f"= input channel i mod C_in), got {num_input_channels}")
        if num_classes < 2:
            raise ValueError(f"MoE-SAM needs >= 2 output classes (background included), got {num_classes}")
        self.image_size = check_image_size(image_size)
        self.num_classes = num_classes
        self.channel_map = [i % num_input_channels for i in range(3)]
        grid = image_size // PATCH
        self.image_encoder = ImageEncoderViT(
            img_size=image_size, patch_size=PATCH, in_chans=3, embed_dim=vit["embed_dim"], depth=vit["depth"],
            num_heads=vit["num_heads"], mlp_ratio=4, out_chans=PROMPT_DIM, qkv_bias=True,
            norm_layer=partial(nn.LayerNorm, eps=1e-6), use_rel_pos=True, window_size=vit["window_size"],
            global_attn_indexes=vit["global_attn_indexes"])
        self.prompt_encoder = PromptEncoder(embed_dim=PROMPT_DIM, image_embedding_size=(grid, grid),
                                            input_image_size=(image_size, image_size), mask_in_chans=16)
        self.mask_decoder = MaskDecoder(
            num_multimask_outputs=num_classes - 1, transformer_dim=PROMPT_DIM, iou_head_depth=3,
            iou_head_hidden_dim=256,
            transformer=TwoWayTransformer(depth=2, embedding_dim=PROMPT_DIM, mlp_dim=2048, num_heads=8))
        self.mask_decoder.deep_supervision = deep_supervision

        self.prompt_encoder.requires_grad_(False)  # only its no-mask embedding and fixed PE are used
        self.image_encoder.requires_grad_(not freeze_encoder)
        self.mask_decoder.iou_prediction_head.requires_grad_(False)  # unused: DDP needs a gradient for every parameter

        if adapters:
            for block in self.image_encoder.blocks:
                attach_block_adapters(block, vit["embed_dim"])
        self._taps: list | None = None
        self.moe = None if not moe else MoEFeatureEnhancement(
            vit["embed_dim"], PROMPT_DIM, hidden_dim=4 * vit["embed_dim"], routing=routing)
        if moe:
            for block in self.image_encoder.blocks:
                block.register_forward_hook(self._tap)
        self.prompt_generator = PromptEmbeddingGenerator(PROMPT_DIM) if prompt_generator else None

    # nnU-Net sets ``network.decoder.deep_supervision``; SAM's decoder keeps its checkpoint name.
    @property
    def decoder(self) -> nn.Module:
        return self.mask_decoder

    @classmethod
    def input_divisor(cls) -> int:
        return 1  # any patch size: the network resizes to S itself

    @classmethod
    def deep_supervision_factors(cls) -> tuple:
        return (1,)

    def _tap(self, module, args, output):
        if self._taps is not None:
            self._taps.append(output)

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, list]:
        """SAM-ready ``(B, 3, S, S)`` images -> SAM's image embedding ``(B, 256, S/16, S/16)`` and, with the MoE
        block, the block outputs (12 x ``(B, S/16, S/16, 768)``)."""
        self._taps = [] if self.moe is not None else None
        try:
            embedding = self.image_encoder(images)
            return embedding, self._taps or []
        finally:
            self._taps = None

    def to_sam_input(self, x: torch.Tensor) -> torch.Tensor:
        """nnU-Net's ``(B, C_in, h, w)`` normalised patch -> SAM's normalised ``(B, 3, S, S)`` input."""
        if x.dim() != 4:
            raise ValueError(f"MoE-SAM is a 2D network: expected (B, C, h, w) input, got shape {tuple(x.shape)}")
        if x.shape[1] != len(set(self.channel_map)):
            raise ValueError(f"MoE-SAM was built for {len(set(self.channel_map))} input channels, got {x.shape[1]}")
        x = x[:, self.channel_map]
        return F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)

    def forward(self, x: torch.Tensor):
        h, w = x.shape[-2:]
        embedding, feats = self.encode(self.to_sam_input(x))
        if self.moe is not None:
            embedding = embedding + self.moe(torch.stack(feats, dim=1))
        b = embedding.shape[0]
        if self.prompt_generator is not None:
            sparse = self.prompt_generator(embedding)
        else:
            sparse = embedding.new_zeros(b, 0, PROMPT_DIM)
        _, dense = self.prompt_encoder(points=None, boxes=None, masks=None)  # no-mask embedding, (1, 256, g, g)
        image_pe = self.prompt_encoder.get_dense_pe()
        masks = torch.cat([self.mask_decoder.predict_masks(embedding[i:i + 1], image_pe, sparse[i:i + 1], dense)[0]
                           for i in range(b)])
        logits = F.interpolate(masks, size=(h, w), mode="bilinear", align_corners=False)
        return [logits] if self.mask_decoder.deep_supervision else logits


def _count(module: nn.Module | None, trainable_only: bool = False) -> int:
    if module is None:
        return 0
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def parameter_report(model: MoESAM) -> dict[str, int]:
    """Parameter counts: SAM's three parts (adapters excluded), what MoE-SAM adds, and the trainable total."""
    adapters = sum(_count(getattr(b, name, None)) for b in model.image_encoder.blocks
                   for name in ("attn_adapter", "mlp_adapter"))
    encoder = _count(model.image_encoder) - adapters
    report = {"image_encoder": encoder, "prompt_encoder": _count(model.prompt_encoder),
              "mask_decoder": _count(model.mask_decoder)}
    report["sam"] = report["image_encoder"] + report["prompt_encoder"] + report["mask_decoder"]
    report.update(adapters=adapters, moe_block=_count(model.moe), prompt_generator=_count(model.prompt_generator),
                  total=_count(model), trainable=_count(model, trainable_only=True))
    return report


def format_parameter_report(model: MoESAM) -> str:
    r = parameter_report(model)
    return (f"MoE-SAM ({model.encoder_name}) parameters at S={model.image_size}, {model.num_classes} classes: total {r['total']:,}; "
            f"{'SAM ViT-B' if model.encoder_name == 'vit_b' else 'SAM parts'} {r['sam']:,} (image encoder {r['image_encoder']:,}, prompt encoder {r['prompt_encoder']:,}, "
            f"mask decoder {r['mask_decoder']:,}); added: adapters {r['adapters']:,}, MoE block {r['moe_block']:,}, "
            f"prompt generator {r['prompt_generator']:,}; trainable {r['trainable']:,}")
