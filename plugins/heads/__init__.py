"""Built-in embeddings and vocabulary heads: text_vocab, image_vocab, caption_mlp, caption_pool, position_table; and
contrastive_text, the caption tower that pretrains the encoder."""

from omnicore import hookimpl


@hookimpl
def register_heads(register):
    from .vocab import caption_mlp, caption_pool, image_vocab, position_table, text_vocab

    register("text_vocab", text_vocab)
    register("image_vocab", image_vocab)
    register("caption_mlp", caption_mlp)
    register("caption_pool", caption_pool)
    register("position_table", position_table)
    from .contrastive import contrastive_text

    register("contrastive_text", contrastive_text)
