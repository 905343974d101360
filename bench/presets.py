"""Model shapes the benchmarks share: the issue's Qwen2-0.5B-shaped model and the demo's
~1M-parameter teacher."""

PRESETS = {
    # Qwen2-0.5B shape (random weights: speed only)
    "qwen05b": dict(vocab_size=151936, hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
                    num_key_value_heads=2, intermediate_size=4864, max_position_embeddings=4096),
    # the demo's bootstrap teacher shape (recipes/demo.yaml)
    "tiny": dict(vocab_size=512, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=4, intermediate_size=320, max_position_embeddings=1024),
}  # fmt: skip
