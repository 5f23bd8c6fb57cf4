"""`alignkit vllm-serve MODEL`: the generation server online methods sample from in generation.vllm_mode=server
(alignkit.online.vllm_server)."""

import click

from alignkit.errors import AlignkitError


@click.command("vllm-serve")
@click.argument("model")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (0.0.0.0: every interface; the API has no authentication).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535),
              help="Port to listen on (0: any free one, printed).")
@click.option("--engine", type=click.Choice(["vllm", "transformers"]), default="vllm", show_default=True,
              help="What samples: vLLM (GPU), or transformers' generate (any machine; the built-in model too).")
@click.option("--tokenizer", help="Tokenizer to load; default: the model's.")
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default=None,
              help="Dtype of the served weights  [default: auto for vllm, float32 for transformers]")
@click.option("--gpu-memory-utilization", default=0.9, show_default=True, type=click.FloatRange(0, 1, min_open=True),
              help="vllm: fraction of the GPU memory it may take.")
@click.option("--trust-remote-code", is_flag=True, help="Allow code from the model repository to run.")
@click.option("--max-lora-rank", default=0, show_default=True, type=click.IntRange(0),
              help="vllm: serve LoRA adapters up to this rank (generation.lora_sync=adapter); 0: off. The transformers "
              "engine takes any adapter.")
def vllm_serve(model, host, port, engine, tokenizer, dtype, gpu_memory_utilization, trust_remote_code,
               max_lora_rank):
    """Serve MODEL for online training (generation.backend=vllm generation.vllm_mode=server): the trainer sends
    token ids and gets completions, and sends its weights after every optimizer step.

    \b
    alignkit vllm-serve Qwen/Qwen2-0.5B --port 8000
    alignkit vllm-serve builtin:tiny --engine transformers --port 8000     (CPU)
    alignkit run --method NAME generation.backend=vllm generation.vllm_mode=server generation.server_port=8000
    """
    from alignkit.online import vllm_server

    if engine == "transformers":
        served = transformers_engine(model, dtype or "float32", tokenizer, trust_remote_code)
    else:
        try:
            from alignkit.online.vllm import VLLMEngine
        except ImportError as e:
            raise AlignkitError(f"--engine vllm needs vLLM: pip install 'alignkit[vllm]' ({e}); or serve with "
                                "--engine transformers") from None
        served = VLLMEngine(model, dtype or "auto", tokenizer, gpu_memory_utilization, trust_remote_code,
                            max_lora_rank=max_lora_rank)
    try:
        server = vllm_server.GenerationServer(served, host, port, model_name=model)
    except OSError as e:
        raise AlignkitError(f"--host {host} --port {port}: cannot listen there ({e.strerror or e}); choose another "
                            "port") from None
    click.echo(f"alignkit vllm-serve: {model} ({engine}) at http://{server.address}", err=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def transformers_engine(model_name: str, dtype: str = "float32", tokenizer_name: str | None = None,
                        trust_remote_code: bool = False, seed: int = 0):
    """`--engine transformers`: the model loaded as a run loads it (the built-in model too)."""
    import torch

    from alignkit.config import ModelConfig
    from alignkit.engine.modeling import load_model, load_tokenizer
    from alignkit.online.vllm_server import TransformersEngine

    cfg = ModelConfig(name_or_path=model_name, tokenizer_name_or_path=tokenizer_name, dtype=dtype,
                      trust_remote_code=trust_remote_code)
    tokenizer = load_tokenizer(cfg)
    model = load_model(cfg, tokenizer, seed)
    if torch.cuda.is_available():
        model = model.cuda()
    return TransformersEngine(model.eval(), tokenizer.pad_token_id)
