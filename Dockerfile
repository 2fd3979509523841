# The image every node of a bitlm cluster runs (head, GPU workers, KubeRay pods): Ray's own CUDA
# image with Python 3.11, whose ray is the project's pinned ray (pyproject.toml), plus torch and
# the project. Build with `make image`; tests/cluster/test_container_image.py checks this file's structure,
# the FROM tag against the pinned ray and every COPY source. Never built on the CI machines (the
# base image cannot be pulled there).
FROM rayproject/ray:2.60.0-py311-cu128

# torch's CUDA 12.8 build at the client's version (the Makefile installs 2.13.0 on the client)
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128

ENV RAY_USAGE_STATS_ENABLED=0 \
    MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# the image's user `ray` (uid 1000, gid 100 `users`) owns the source tree pip builds in
WORKDIR /home/ray/bitlm
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users LICENSE ./LICENSE
COPY --chown=ray:users bitlm ./bitlm
COPY --chown=ray:users pipelines ./pipelines
COPY --chown=ray:users serve ./serve
COPY --chown=ray:users tune ./tune
COPY --chown=ray:users cluster ./cluster

# The image's ray is the cluster's ray: pip may add the train/tune/serve extras' dependencies but
# never another ray (the constraint makes a conflicting requirement an error, not a reinstall).
# boto3 and google-cloud-storage let the head's MLflow server keep artifacts in S3 or GCS.
RUN python -c "import ray; print('ray==' + ray.__version__)" > /tmp/ray-constraint.txt \
    && pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}" \
    && pip install --no-cache-dir -c /tmp/ray-constraint.txt . "boto3>=1.26" "google-cloud-storage>=2.0" \
    && python -c "import ray, torch, bitlm, pipelines.train, serve.app, cluster.cli; assert ray.__version__ == '2.60.0', ray.__version__"
