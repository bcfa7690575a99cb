# GPU serving image: CUDA torch from the base image, seeright on top. The model is a runtime argument:
#   docker build -t seeright .
#   docker run --gpus all -p 8000:8000 -v ~/.cache/huggingface:/root/.cache/huggingface seeright \
#       --model llava-hf/llava-1.5-7b-hf --device cuda --dtype float16
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime
WORKDIR /app
COPY pyproject.toml README.md ./
COPY interventions ./interventions
COPY service ./service
COPY eval ./eval
COPY configs ./configs
COPY model_zoo ./model_zoo
COPY testbed ./testbed
COPY tools ./tools
RUN pip install --no-cache-dir .
EXPOSE 8000
ENTRYPOINT ["seeright", "serve", "--host", "0.0.0.0", "--port", "8000"]
CMD ["--model", "seeright/shapes-llava"]
