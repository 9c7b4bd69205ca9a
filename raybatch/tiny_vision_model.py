"""A tiny random-weight vision-language model (Idefics3, the SmolVLM family: a SigLIP-like
vision tower, a pixel-shuffle connector, the tiny Llama), with the tiny model's
tokenizer plus Idefics3's image tokens, built without the model hub as
`tiny_model.build_tiny_model` builds the text model.

Idefics3 because vLLM's CPU build serves it with transformers' own processor and
nothing more: torchvision is not installed beside the CPU torch (README), and vLLM's
LLaVA, Qwen2-VL and most others import processors that need it; Idefics3's image
processor has a PIL backend. Images are not split into tiles (`do_image_splitting`
off) and are resized to 32x32, so every image costs the same few tokens.
"""

from __future__ import annotations

import os
from pathlib import Path

from raybatch.tiny_model import MAX_POSITION_EMBEDDINGS, SHAPES, SPECIAL_TOKENS, train_tokenizer

IMAGE_TOKEN = "<image>"
IMAGE_TOKENS_ADDED = ["<fake_token_around_image>", IMAGE_TOKEN, "<end_of_utterance>", "<global-img>"]
IMAGE_SIZE = 32
PATCH_SIZE = 8
SCALE_FACTOR = 2
# <image> tokens per image: patches, merged SCALE_FACTOR² at a time by the connector.
IMAGE_SEQ_LEN = (IMAGE_SIZE // PATCH_SIZE) ** 2 // SCALE_FACTOR**2
# What one image adds to a prompt, as vLLM counts it: the one <image> the template
# writes becomes <fake_token_around_image><global-img>, IMAGE_SEQ_LEN <image>s and
# <fake_token_around_image> again.
IMAGE_PROMPT_TOKENS = IMAGE_SEQ_LEN + 3

# The tiny model's ChatML template, taught OpenAI-style content lists: vLLM sees the
# loop over `content` and hands the template `{"type": "image"}` parts where images were.
VISION_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<image>' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_tiny_vision_model(path: str | os.PathLike, seed: int = 0) -> Path:
    """Write the model, its tokenizer and its processor to `path`; return it."""
    import torch
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor, LlamaConfig
    from transformers.models.idefics3.configuration_idefics3 import Idefics3VisionConfig
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer([*SPECIAL_TOKENS, *IMAGE_TOKENS_ADDED])
    tokenizer.chat_template = VISION_CHAT_TEMPLATE
    image_processor = Idefics3ImageProcessorPil(
        do_image_splitting=False,
        size={"longest_edge": IMAGE_SIZE},
        max_image_size={"longest_edge": IMAGE_SIZE},
    )
    processor = Idefics3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_seq_len=IMAGE_SEQ_LEN,
        chat_template=VISION_CHAT_TEMPLATE,
    )
    processor.save_pretrained(out)

    text = LlamaConfig(
        vocab_size=len(tokenizer),
        **SHAPES["tiny"],
        num_key_value_heads=SHAPES["tiny"]["num_attention_heads"],
        max_position_embeddings=MAX_POSITION_EMBEDDINGS,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    vision = Idefics3VisionConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
    )
    config = Idefics3Config(
        vision_config=vision.to_dict(),
        text_config=text.to_dict(),
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        scale_factor=SCALE_FACTOR,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
        torch_dtype="bfloat16",
    )
    torch.manual_seed(seed)
    model = Idefics3ForConditionalGeneration(config).to(torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)
    return out
