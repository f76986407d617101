"""Model code: Flax NNX MoE layers (:mod:`.layers`) built on the token dispatcher."""
