"""Built-in understanding encoders (timm: siglip, dinov2, dinosiglip, timm_vit; HoVLE's image embedding: hovle_patch)
and the MMU projector (mlp_gelu).

Heavy imports (torch, timm) happen inside the factories' module, loaded when the hook runs; building a model
happens only on ``create``.
"""

from omnicore import hookimpl


@hookimpl
def register_encoders(register):
    from .hovle import hovle_patch
    from .projector import mlp_gelu
    from .timm_encoders import dinosiglip, dinov2, siglip, timm_vit

    register("siglip", siglip)
    register("dinov2", dinov2)
    register("dinosiglip", dinosiglip)
    register("timm_vit", timm_vit)
    register("hovle_patch", hovle_patch)
    register("mlp_gelu", mlp_gelu, kind="projector")
