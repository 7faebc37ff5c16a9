"""Memory savers for training a 7B on one GPU: LoRA adapters (peft) and gradient checkpointing. Both training stages
add the flags with add_flags and call prepare once on the freshly loaded model; the returned finish() merges the
adapters back into the weights before saving, so OUT is a plain save_pretrained folder that every later stage (and
any transformers or vLLM user) loads unchanged.

LoRA (Hu et al. 2021, arXiv 2106.09685): a frozen weight W (d_out × d_in) gets a trainable low-rank update,
    W x  →  W x + (α / r) · B A dropout(x),     A: r × d_in (random), B: d_out × r (zeros: the start is the model itself)
so only r (d_in + d_out) numbers per adapted matrix train; merging writes W + (α / r) B A into W."""

DEFAULT_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"  # every linear map of a Llama/Mistral layer


def add_flags(p):
    """--lora R (0 = train the full weights), --lora-alpha, --lora-dropout, --lora-targets, --grad-checkpointing."""
    p.add_argument("--lora", type=int, default=0, metavar="R",
                   help="train rank-R LoRA adapters (peft) instead of the full weights; merged into OUT at the end")
    p.add_argument("--lora-alpha", type=float, default=16.0, help="LoRA scale α (the update is α/R · BA)")
    p.add_argument("--lora-dropout", type=float, default=0.0, help="dropout on the adapters' input")
    p.add_argument("--lora-targets", default=DEFAULT_TARGETS, help="comma list of the linear modules to adapt")
    p.add_argument("--grad-checkpointing", action="store_true",
                   help="recompute each decoder layer's activations in backward instead of keeping them")


def prepare(model, args, trainable=()):
    """Apply --lora and --grad-checkpointing to `model` in place (it keeps its class and submodule names, so the
    stage's own code and freezing keep working). trainable: names of submodules that train in full beside the
    adapters (train_rm's head). → finish(): merges the adapters into the weights and returns the plain model."""
    if args.grad_checkpointing:  # non-reentrant: works with frozen inputs (embeddings) and FSDP2
        model.config.use_cache = False  # training keeps no KV cache anyway
        kw = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # the name from transformers 5.2x on
            model.activation_checkpointing_enable(kw)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)
    if not args.lora:
        return lambda: model
    if getattr(args, "fsdp", False):
        raise SystemExit("error: --lora trains under DDP or in one process; --fsdp is for the full weights")
    from peft import LoraConfig, get_peft_model
    config = LoraConfig(r=args.lora, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                        target_modules=[t.strip() for t in args.lora_targets.split(",") if t.strip()], bias="none")
    peft_model = get_peft_model(model, config)  # injects the adapters into `model` and freezes everything else
    for name in trainable:
        model.get_submodule(name).requires_grad_(True)
    return peft_model.merge_and_unload  # W ← W + (α/r) B A, adapters removed: `model` again, plain modules
