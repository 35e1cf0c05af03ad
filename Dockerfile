# GPU image for diffprobe. The base image brings CUDA PyTorch; the pin written below keeps
# pip from replacing it while installing diffprobe and nnunetv2.
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime

WORKDIR /opt/diffprobe
COPY pyproject.toml README.md ./
COPY diffprobe ./diffprobe
RUN python -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > /tmp/torch-pin.txt \
    && pip install --no-cache-dir -c /tmp/torch-pin.txt . \
    && diffprobe --help > /dev/null

# Mount your data at /data; diffprobe also honours nnUNet_raw/_preprocessed/_results.
ENV DIFFPROBE_RAW=/data/raw \
    DIFFPROBE_PREPROCESSED=/data/preprocessed \
    DIFFPROBE_RESULTS=/data/results
VOLUME ["/data"]
ENTRYPOINT ["diffprobe"]
CMD ["--help"]
