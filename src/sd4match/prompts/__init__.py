"""Prompts for the UNet's cross-attention: text, empty, learned (single, per category), CPM.

Each kind is a module that registers its class (``prompts.base.register``); importing this
package registers the kinds it ships, in the order they are listed to users.
"""

# isort: skip_file  (the kinds register in import order: text, empty, single, category, cpm, cpm-image, hidden, hidden-category)
from sd4match.prompts.text import EmptyPrompt, TextPrompt
from sd4match.prompts.learned import CategoryPrompt, SinglePrompt
from sd4match.prompts.cpm import ConditionalPrompt, ImageConditionalPrompt
from sd4match.prompts.hidden import HiddenCategoryPrompt, HiddenPrompt

from sd4match.features.text import TextEncoderBridge
from sd4match.prompts.base import (N_TOKENS, PROMPT_CLASSES, PROMPT_KINDS, Prompt, PromptConfig, PromptKind, base_category, learned_kinds, prompt_class,
                                   read_prompt_config, read_prompt_tensors, register)
from sd4match.prompts.build import bridge_for, load_prompt, make_prompt, prompt_fingerprint, resolve_prompt
from sd4match.prompts.spec import DEFAULT_TEMPLATE, PromptSpec, check_prompt, parse_prompt

__all__ = [
    "CategoryPrompt", "ConditionalPrompt", "DEFAULT_TEMPLATE", "EmptyPrompt", "HiddenCategoryPrompt", "HiddenPrompt", "ImageConditionalPrompt", "N_TOKENS", "PROMPT_CLASSES", "PROMPT_KINDS", "Prompt", "PromptConfig", "PromptKind",
    "PromptSpec", "SinglePrompt", "TextEncoderBridge", "TextPrompt", "base_category", "bridge_for", "check_prompt", "learned_kinds", "load_prompt",
    "make_prompt", "parse_prompt", "prompt_class", "prompt_fingerprint", "read_prompt_config", "read_prompt_tensors", "register", "resolve_prompt",
]
