"""A tiny random-weight Llama with a tokenizer trained on the spot.

No model hub is reachable on our CI and development machines, so tests and the
README's first command use this model. It is small enough to start in vLLM's CPU build
in well under a minute and generates ~8k tokens/s on two cores. Its text is noise; its
shapes, tokenizer and chat template are real, which is what the pipeline needs.

The same seed gives the same bytes: the corpus is fixed, BPE training is deterministic
and the weights come from a seeded generator.
"""

from __future__ import annotations

import os
from pathlib import Path

# A ChatML-style template, so chat rows are rendered the way real chat models render them.
# With `tools` it adds a Hermes/Qwen-style tools block, renders an assistant turn's calls
# as <tool_call> JSON and a tool turn as a <tool_response>, as Qwen2.5's template does:
# the tiny model is served with vLLM's "hermes" tool-call parser. Without tools, every
# message renders as it always did.
CHAT_TEMPLATE = (
    "{% if tools %}"
    "{{ '<|im_start|>system\n' }}"
    "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] + '\n\n' }}{% endif %}"
    "{{ '# Tools\nFunction signatures within <tools></tools>:\n<tools>' }}"
    "{% for tool in tools %}{{ '\n' + (tool | tojson) }}{% endfor %}"
    "{{ '\n</tools>\nReturn each call as <tool_call>{\"name\": ..., \"arguments\": {...}}</tool_call>'"
    " + '<|im_end|>\n' }}"
    "{% endif %}"
    "{% for message in messages %}"
    "{% if tools and loop.first and message['role'] == 'system' %}"
    "{% elif message['role'] == 'assistant' and message['tool_calls'] %}"
    "{{ '<|im_start|>assistant\n' + (message['content'] or '') }}"
    "{% for call in message['tool_calls'] %}"
    "{{ '<tool_call>{\"name\": ' + (call['function']['name'] | tojson) + ', \"arguments\": '"
    " + call['function']['arguments'] + '}</tool_call>' }}"
    "{% endfor %}{{ '<|im_end|>\n' }}"
    "{% elif message['role'] == 'tool' %}"
    "{{ '<|im_start|>tool\n<tool_response>' + message['content'] + '</tool_response><|im_end|>\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# The markup of vLLM's "hermes" tool-call parser and of the <think> reasoning parsers
# ("deepseek_r1", "qwen3"), which look these up in the vocabulary. Added after training,
# so every other token keeps its id, and not special (as in Qwen's tokenizers), so the
# decoded text keeps them for the parsers.
MARKUP_TOKENS = ["<tool_call>", "</tool_call>", "<think>", "</think>"]
VOCAB_SIZE = 1024
MAX_POSITION_EMBEDDINGS = 2048


def _training_corpus() -> list[str]:
    """A fixed corpus: enough English, JSON and digits for merges that look like words."""
    words = (
        "the quick brown fox jumps over the lazy dog while a batch of requests streams "
        "through ray data into vllm engines and every line ends up exactly once in the "
        "results file or in the error file hello world answer question summary token "
        "model prompt completion system user assistant json object schema color red green"
    ).split()
    lines = []
    for i in range(400):
        sentence = " ".join(words[(i * 7 + j * 3) % len(words)] for j in range(12))
        lines.append(f"{sentence}. {{\"id\": {i}, \"value\": \"{words[i % len(words)]}\"}}")
    return lines


# Shapes: "tiny" (~1M parameters, starts fast: tests and the demo), "small" (~13M: the
# engine-pool benchmarks on a 2-core CPU) and "bench" (~110M, compute-dominant like a
# real model: throughput benchmarks where there is time or a GPU).
SHAPES = {
    "tiny": {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4},
    "small": {"hidden_size": 512, "intermediate_size": 1536, "num_hidden_layers": 4, "num_attention_heads": 8},
    "bench": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12},
}


def train_tokenizer(special_tokens: list[str] = SPECIAL_TOKENS):
    """The byte-level BPE tokenizer, trained on the fixed corpus, with the chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_training_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    fast.add_tokens(MARKUP_TOKENS)
    fast.chat_template = CHAT_TEMPLATE
    fast.model_max_length = MAX_POSITION_EMBEDDINGS
    return fast


def build_tiny_model(path: str | os.PathLike, seed: int = 0, shape: str = "tiny") -> Path:
    """Write the model to `path` (created if needed) and return it."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    fast = train_tokenizer()
    fast.save_pretrained(out)
    trained_vocab = len(fast) - len(MARKUP_TOKENS)  # the markup tokens come last, added

    config = LlamaConfig(
        vocab_size=trained_vocab,
        **SHAPES[shape],  # head dimension 64 in both: vLLM CPU needs >= 32
        num_key_value_heads=SHAPES[shape]["num_attention_heads"],
        max_position_embeddings=MAX_POSITION_EMBEDDINGS,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
        tie_word_embeddings=True,
        torch_dtype="bfloat16",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    # Rows for MARKUP_TOKENS appended to the seeded weights: the trained tokens' weights
    # are those the model had before it had these tokens.
    model.resize_token_embeddings(len(fast))
    model = model.to(torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)
    return out
