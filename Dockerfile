# syntax=docker/dockerfile:1
# tide-vllm image.
#   docker build -t tide-vllm .
#       auto-start: vLLM's official image with Node 20 and tide-vllm added (run with --gpus all)
#   docker build --build-arg RUNTIME_IMAGE=node:20-bookworm-slim -t tide-vllm:manual .
#       manual mode: tide-vllm alone, for a vLLM that runs in another container or host

ARG BUILD_IMAGE=node:20-bookworm-slim
# :latest moves: for production, pin the vLLM release you tested, e.g.
#   docker build --build-arg RUNTIME_IMAGE=vllm/vllm-openai:v0.16.0 -t tide-vllm .
ARG RUNTIME_IMAGE=vllm/vllm-openai:latest

# ---- build: compile TypeScript, keep production dependencies only
FROM ${BUILD_IMAGE} AS build
WORKDIR /app
COPY package.json package-lock.json ./
RUN npm ci --no-audit --no-fund
COPY tsconfig.json tsconfig.build.json nest-cli.json ./
COPY src src
COPY tools tools
RUN npm run build && npm prune --omit=dev

# ---- runtime
FROM ${RUNTIME_IMAGE}
# The vLLM image has Python, not Node: bring the build's Node 20 (a no-op on a node base image).
COPY --from=build /usr/local/bin/node /usr/local/bin/node
# tini as PID 1 forwards signals to the service and reaps orphans, so none lingers as a zombie.
RUN apt-get update && apt-get install -y --no-install-recommends tini && rm -rf /var/lib/apt/lists/*
WORKDIR /app
ENV NODE_ENV=production
COPY --from=build /app/node_modules node_modules
COPY --from=build /app/dist dist
COPY package.json ./
COPY conf conf
EXPOSE 10002
# Docker's own liveness check (`docker ps` shows it): the CLI's `health` command, GET /health —
# 200 while the model loads, so no start period is needed, and "healthy" means started, not serving
# (what waits for the model polls /ready). A
# web.bind_address.port other than 10002, or a web.bind_address.host that is not 0.0.0.0/127.0.0.1:
# -e TIDE_VLLM_URL=http://HOST:PORT.
HEALTHCHECK --interval=30s --timeout=10s --retries=3 CMD ["node", "dist/src/cli.js", "health", "--timeout", "5"]
# The same node flags as `npm start`: why each, in README "Performance" (Node flags).
ENTRYPOINT ["/usr/bin/tini", "--", "node", "--max-semi-space-size=4", "--no-allocation-site-pretenuring", "--single-threaded-gc", "dist/src/main.js"]
# No CMD: without -c the service reads $TIDE_VLLM_CONFIG, else conf/tide-vllm.yaml (a -c here
# would override the variable). `docker run IMAGE -c /path.yaml` passes one.
