"""How much of the label token reaches the generator's trained layers? Prints measured numbers.

Real train sentences are encoded once as ``<bos_0> text`` and once as ``<bos_1> text`` (label
tokens as stage 1 starts them, or as a trained generator has them), with and without the sink
token in front. For each it prints the relative difference of the hidden states between the two
labels at the input of the first trained layer (at the label position and over the text), and
the KL divergence of the next-token distributions over the text. Pre-trained LMs turn position 0
into an attention sink with huge activations, which swamps a label token placed there.

    python benchmarks/label_signal.py configs/bench/sst2.yaml
    python benchmarks/label_signal.py configs/bench/sst2.yaml --generator runs/sst2-bench/generator-lm
"""

from __future__ import annotations

import click
import torch
import torch.nn.functional as F

from dilm_ray.config import load_config
from dilm_ray.errors import UserError


@torch.no_grad()
def label_signal(gen, texts: list[str], layer: int, sink: bool) -> dict[str, float]:
    """Mean over ``texts`` of the label-0 vs label-1 differences (see the module docstring)."""
    from dilm_ray.models.generator import sink_token_id

    prefix = [sink_token_id(gen.tokenizer)] if sink else []
    rel_label, rel_text, kl, norm0 = [], [], [], []
    for text in texts:
        ids = gen.tokenizer(text, add_special_tokens=False)["input_ids"]
        runs = []
        for label in (0, 1):
            out = gen.model(input_ids=torch.tensor([prefix + [gen.bos_ids[label]] + ids]), output_hidden_states=True)
            runs.append((out.hidden_states[layer][0], out.logits[0].log_softmax(-1)))
        (h0, lp0), (h1, lp1) = runs
        rel = ((h0 - h1).norm(dim=-1) / h0.norm(dim=-1)).tolist()
        p = len(prefix)
        rel_label.append(rel[p])
        rel_text.append(sum(rel[p + 1 :]) / max(1, len(rel) - p - 1))
        kl.append(F.kl_div(lp1[p:], lp0[p:], log_target=True, reduction="none").sum(-1).mean().item())
        norm0.append(h0[0].norm().item() / h0[1:].norm(dim=-1).mean().item())
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    return {"rel_diff_label": mean(rel_label), "rel_diff_text": mean(rel_text), "kl_text": mean(kl), "pos0_norm_ratio": mean(norm0)}


@click.command()
@click.argument("config")
@click.argument("overrides", nargs=-1)
@click.option("--generator", "generator_dir", help="a trained generator folder (default: the packaged model as stage 1 starts it)")
@click.option("--sentences", type=int, default=50, show_default=True)
def main(config: str, overrides: tuple[str, ...], generator_dir: str | None, sentences: int) -> None:
    import sys

    from dilm_ray.models.blocks import transformer_blocks
    from dilm_ray.models.generator import build_generator
    from dilm_ray.data import load_data
    from dilm_ray.seeding import setup_torch

    try:
        cfg = load_config(config, [*overrides, f"data.max_train_samples={sentences}"])
        setup_torch(cfg)
        data = load_data(cfg)
        gen = build_generator(cfg.generator, data.task, generator_dir)
        gen.model.eval()
        n_layers = len(transformer_blocks(gen.model))
        layer = n_layers - (cfg.generator.train_top_layers or n_layers)  # hidden_states[i] feeds block i
        texts = [" ".join(t) for t in data.train.texts]
        click.echo(f"{len(texts)} train sentences, hidden states at the input of block {layer} of {n_layers}")
        click.echo("| prompt | rel. diff at label token | rel. diff over text | next-token KL over text | norm pos 0 / rest |")
        click.echo("|---|---|---|---|---|")
        for sink in (False, True):
            s = label_signal(gen, texts, layer, sink)
            name = "`[sink] <bos_i> text`" if sink else "`<bos_i> text`"
            click.echo(f"| {name} | {s['rel_diff_label']:.3f} | {s['rel_diff_text']:.3f} | {s['kl_text']:.3f} | {s['pos0_norm_ratio']:.0f} |")
    except UserError as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
