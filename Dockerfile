# Training / inference image for tfseg (CPU). For a GPU image use
# tensorflow/tensorflow:2.21.0-gpu as the base and install with ".[gpu]" after removing
# tensorflow-cpu (the two wheels install the same package and must not coexist).
FROM tensorflow/tensorflow:2.21.0

WORKDIR /opt/tfseg
ENV KERAS_BACKEND=tensorflow \
    TF_CPP_MIN_LOG_LEVEL=2 \
    PYTHONUNBUFFERED=1

# The base image ships the full `tensorflow` wheel; install the project without letting pip
# add `tensorflow-cpu` on top of it.
COPY setup.py README.md ./
COPY tfseg ./tfseg
COPY preprocessing ./preprocessing
COPY launch ./launch
RUN python -m pip install --no-cache-dir "keras>=3.5,<4" "SimpleITK>=2.3,<3" "absl-py>=2" \
        "scipy>=1.10" "matplotlib>=3.7" \
    && python -m pip install --no-cache-dir --no-deps -e .

# Data, records and runs are mounted at run time, e.g.
#   docker run --rm -v /data/ACDC:/data -v $PWD/runs:/opt/tfseg/runs tfseg \
#       --method=supervised --dataset=acdc --data_dir=/data
ENTRYPOINT ["python", "-m", "launch.train"]
CMD ["--help"]
