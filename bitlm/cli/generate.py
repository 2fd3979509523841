"""`bitlm generate`: sample a continuation of a prompt."""

from __future__ import annotations

import click

from . import loading
from .options import diffusion_options

# diffusion sampling divides by the temperature: 0 (greedy) is sampled as this, as the server does
MIN_DIFFUSION_TEMPERATURE = 1e-30


@click.command("generate")
@click.argument("model_dir", type=click.Path(exists=True, file_okay=False), callback=loading.model_dir)
@click.option("--prompt", default="The ", show_default=True, callback=loading.utf8_text,
              help="Text to continue (at least one byte).")
@click.option("--max-new-bytes", default=200, show_default=True, type=click.IntRange(min=0), help="Bytes to generate.")
@click.option("--temperature", default=0.8, show_default=True, type=click.FloatRange(min=0), callback=loading.finite,
              help="0 = greedy.")
@click.option("--top-k", type=click.IntRange(min=1), default=None,
              help="Keep the k most likely values (bit models have 2).")
@click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=None, callback=loading.finite,
              help="Nucleus sampling mass in (0, 1].")
@click.option("--sampling-unit", type=click.Choice(["bit", "byte"]), default=None,
              help="What one draw picks and temperature/top-k/top-p act on: a byte's bit patterns (patched models' "
                   "default; the byte baseline's only unit) or one bit (the flat bit model's only unit).")
@click.option("--seed", type=loading.SEEDS, default=None, help="Random seed for a reproducible sample.")
@diffusion_options
@click.option("--safe", is_flag=True, help="Gate the sample on C and S (retrying a blocked one with new seeds).")
@click.option("--c-floor", type=click.FloatRange(0, 1), default=None, callback=loading.finite,
              help="With --safe: minimum LZ complexity C [the run's safety.c_floor, else 0.3].")
@click.option("--s-floor", type=click.FloatRange(0, 1), default=None, callback=loading.finite,
              help="With --safe: minimum symbiosis S [the run's safety.s_floor, else 0.5].")
@click.option("--max-retries", type=click.IntRange(min=0), default=None,
              help="With --safe: retries after a block [the run's safety.max_retries, else 2].")
@click.option("--strict", is_flag=True, help="With --safe: exit with an error when every attempt is blocked.")
@click.option("--device", default=None, callback=loading.device,
              help="torch device (default: cuda if available, else cpu).")
def generate_command(model_dir, prompt, max_new_bytes, temperature, top_k, top_p, sampling_unit, seed, diffusion, noise_schedule,
                     diffusion_steps, safe, c_floor, s_floor, max_retries, strict, device):
    """Continue --prompt with the model in MODEL_DIR (a model, checkpoint or run directory).

    Causal models decode with the KV cache; non-causal (diffusion) models, or --diffusion, fill the
    continuation by reverse diffusion. Parity is enforced after sampling either way. Patched
    models sample a whole byte per step unless --sampling-unit bit (--safe samples in the default unit).
    """
    from ..checkpoint import from_pretrained
    from ..diffusion import diffusion_sample
    from ..engine import resolve_device
    from ..sampling import generate, resolve_sampling_unit

    model = from_pretrained(model_dir, device=resolve_device(device))
    if sampling_unit is not None:
        if diffusion or not model.config.causal or safe:
            raise click.UsageError("--sampling-unit applies to causal sampling without --safe")
        try:
            resolve_sampling_unit(model.config, sampling_unit)
        except ValueError as err:
            raise click.BadParameter(str(err), param_hint="--sampling-unit") from None
    if diffusion and model.config.causal:
        raise click.UsageError(f"{model_dir} holds a causal model; --diffusion needs one trained with --diffusion")
    if safe:
        gate_config = _gate_config(model_dir, c_floor=c_floor, s_floor=s_floor, max_retries=max_retries,
                                   strict=True if strict else None)
        _safe_generate(model, prompt, max_new_bytes, temperature, seed, gate_config, diffusion_steps or 16,
                       noise_schedule or "cosine")
        return
    try:
        if not model.config.causal:
            out = diffusion_sample(model, prompt, max_new_bytes, steps=diffusion_steps or 16,
                                   schedule=noise_schedule or "cosine", temperature=_diffusion_temperature(temperature),
                                   seed=seed)
        else:
            out = generate(model, prompt, max_new_bytes, temperature=temperature, top_k=top_k, top_p=top_p,
                           seed=seed, sampling_unit=sampling_unit)
    except ValueError as err:
        raise click.BadParameter(str(err)) from None
    click.echo(out.text)
    if out.n_parity_corrections:
        click.echo(f"[{out.n_parity_corrections} parity bit(s) corrected]", err=True)


def _gate_config(model_dir, **given):
    """The `safety` section of the run that holds the model (bitlm.rundir.run_safety_config), the given options on top."""
    import dataclasses

    from ..rundir import run_safety_config

    try:
        base, _ = run_safety_config(model_dir)
    except ValueError as err:
        raise click.BadParameter(str(err)) from None
    return dataclasses.replace(base, **{k: v for k, v in given.items() if v is not None})


def _safe_generate(model, prompt, max_new_bytes, temperature, seed, gate_config, steps, schedule):
    """Print the gated sample, then the verdict as one JSON line on stderr (the audit record)."""
    from ..diffusion import diffusion_sample
    from ..safety import SafetyBlocked, SafetyGate, safe_sample_with_retry

    def diffusion_sampler(m, p, n, s):
        return diffusion_sample(m, p, n, steps=steps, schedule=schedule,
                                temperature=_diffusion_temperature(temperature), seed=s)

    try:
        text, verdict = safe_sample_with_retry(
            model, prompt, max_new_bytes, gate=SafetyGate(gate_config), seed=0 if seed is None else seed,
            temperature=temperature,
            diffusion_sampler=None if model.config.causal else diffusion_sampler)
    except SafetyBlocked as blocked:
        click.echo(blocked.verdict.to_json(), err=True)
        raise click.ClickException(f"blocked by the safety gate: {blocked}") from None
    except ValueError as err:
        raise click.BadParameter(str(err)) from None
    click.echo(text)
    click.echo(verdict.to_json(), err=True)


def _diffusion_temperature(temperature: float) -> float:
    return max(temperature, MIN_DIFFUSION_TEMPERATURE)
