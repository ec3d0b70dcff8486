# The image the processor job definitions in processors/ run.
#   docker build -t stacchip:1.0.0 .
#   docker run --rm -e AWS_BATCH_JOB_ARRAY_INDEX=0 -e STACCHIP_BUCKET=my-bucket \
#       -e STACCHIP_MGRS_SOURCE=s3://my-config-bucket/mgrs_sample.fgb stacchip:1.0.0 stacchip-sentinel-2
# rasterio, pyogrio and pyproj wheels bundle GDAL and PROJ: no system GDAL is needed.
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /opt/stacchip
COPY pyproject.toml README.md ./
COPY stacchip ./stacchip
RUN pip install --no-cache-dir . \
    && stacchip-sentinel-2 --help > /dev/null \
    && stacchip-landsat --help > /dev/null \
    && stacchip-naip --help > /dev/null \
    && stacchip-linz --help > /dev/null \
    && stacchip-sentinel-1 --help > /dev/null \
    && stacchip-modis --help > /dev/null

RUN useradd --create-home --uid 10001 --user-group stacchip
USER 10001:10001
WORKDIR /home/stacchip

# Batch definitions set the command (one console script per source).
CMD ["stacchip", "--help"]
