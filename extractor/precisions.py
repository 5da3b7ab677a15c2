"""The precisions a run can use: the one list the CLI, the settings and the README take (no torch import,
so ``--help`` stays fast)."""

# The one list of precisions (CLI choices, settings, README). On a GPU, "fp32" is strict
# float32 (TF32 off, the CPU's numbers up to summation order) and "tf32" keeps float32 tensors
# but lets cuDNN and cuBLAS multiply on TF32 tensor cores (10 mantissa bits, float32 sums).
PRECISIONS = ("auto", "fp32", "tf32", "bf16", "fp16")
PRECISION_HELP = ("auto = fp32 on the CPU (fused fast path, official numbers) and tf32 on an Ampere or newer "
                  "GPU (float32 tensors, TF32 tensor cores); fp32 on a GPU is strict float32; bf16 / fp16 "
                  "autocast are faster on a GPU but move the embeddings (cosine ~0.99, see README)")
