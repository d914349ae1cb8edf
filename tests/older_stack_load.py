"""Run by tests/test_lora_older_stack.py with an older diffusers/transformers (not this project's stack).

Loads the tiny base model, applies the adapter with diffusers' stock `load_lora_weights`, and writes the text
encoder's and UNet's outputs on fixed inputs, so the test can compare them with the models the current stack trained.
Imports nothing from `pipeline`: it is what a user of the older stack would run.

Usage: python older_stack_load.py <base model folder> <adapter folder> <inputs.safetensors> <out.safetensors>
"""

import sys

import diffusers
import torch
import transformers
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file, save_file


def main(model: str, adapter: str, inputs_path: str, out_path: str) -> None:
    inputs = load_file(inputs_path)
    pipe = StableDiffusionPipeline.from_pretrained(model, tokenizer=None, safety_checker=None)
    # The tiny base was saved by transformers 5, whose CLIPTextModel is flat (`encoder.layers...`); transformers 4
    # reads real checkpoints, which keep `text_model.`. Load the same weights into the nested module.
    flat = load_file(f"{model}/text_encoder/model.safetensors")
    pipe.text_encoder.text_model.load_state_dict({k.removeprefix("text_model."): v for k, v in flat.items()})
    with torch.no_grad():
        base = pipe.text_encoder(inputs["ids"])[0]
    pipe.load_lora_weights(adapter, weight_name="pytorch_lora_weights.safetensors")
    with torch.no_grad():
        text = pipe.text_encoder(inputs["ids"])[0]
        unet = pipe.unet(inputs["x"], inputs["t"], inputs["emb"]).sample
    versions = {"diffusers": diffusers.__version__, "transformers": transformers.__version__}
    save_file({"base_text": base, "text": text, "unet": unet}, out_path, metadata=versions)


if __name__ == "__main__":
    main(*sys.argv[1:5])
