# egressgw image, one for both programs (entrypoint `egressgw`; each DaemonSet passes its
# command as args): `egressgw run --kubernetes` on the gateway nodes and `egressgw agent
# --kubernetes` on the worker nodes, with nftables and iproute2 from Debian 12.
# Build: docker build -t egressgw:0.1.0 .
# Every version is pinned: the base image tag (pin its digest too where you build:
# FROM python:3.11.7-slim-bookworm@sha256:<digest>), the Debian packages, and the whole Python
# dependency tree, so two builds from the same commit hold the same software.

ARG PYTHON_IMAGE=python:3.11.7-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
# the package and its runtime dependencies, as wheels; the lab, tests and tools stay out
COPY pyproject.toml README.md ./
COPY egressgw ./egressgw
# egressgw/crds/*.yaml are symlinks to these: the loader validates with the CRDs' own schemas
COPY manifests/crds ./manifests/crds
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels . \
 && pip wheel --no-cache-dir --wheel-dir /wheels \
      aiohappyeyeballs==2.7.1 aiohttp==3.14.5 aiosignal==1.4.0 annotated-types==0.8.0 \
      attrs==26.1.0 cachetools==8.0.1 certifi==2026.10.18 charset-normalizer==3.5.2 \
      dnslib==0.9.26 durationpy==0.11 frozenlist==1.8.0 idna==3.20 jsonschema==4.26.0 \
      jsonschema-specifications==2025.9.1 kubernetes==37.0.2 multidict==7.2.1 \
      oauthlib==4.0.1 prometheus-client==0.26.0 propcache==0.5.4 pydantic==2.14.3 \
      pydantic-core==2.50.4 pyroute2==0.9.7 python-dateutil==4.0.0 pyyaml==6.0.3 \
      referencing==0.37.0 requests==2.34.2 requests-oauthlib==2.0.0 rpds-py==2026.9.1 \
      typing-extensions==4.16.0 typing-inspection==0.4.5 tzdata==2026.6 urllib3==2.8.0 \
      websocket-client==1.9.2 yarl==1.25.1 aiohttp-retry==2.9.1

FROM ${PYTHON_IMAGE}
# nft loads the constant ruleset skeleton; ip is for operators debugging on the node
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      nftables=1.0.6-2+deb12u2 iproute2=6.1.0-3 \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index --find-links=/wheels egressgw==0.1.0 \
 && rm -rf /wheels
# Root inside the container, but the DaemonSet grants only NET_ADMIN and NET_RAW (not
# privileged), drops every other capability and keeps the root filesystem read-only: netlink
# and nftables need those capabilities, which a non-root user would not have without file caps.
# hadolint ignore=DL3002
USER 0:0
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
# metrics and probes: 9460 the gateway (run), 9461 the agent
EXPOSE 9460 9461
# without args the image runs the gateway; the agent DaemonSet passes `agent ...`
ENTRYPOINT ["egressgw"]
CMD ["run", "--kubernetes", "--uplink", "eth0", "--http-listen", "0.0.0.0:9460"]
