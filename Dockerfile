# syntax=docker/dockerfile:1
# tide-vllm images.
#   docker build -t tide-vllm .                      auto-start: tide-vllm and vLLM in one image (GPU)
#   docker build --target manual -t tide-vllm:manual .   manual mode: tide-vllm only, vLLM runs elsewhere

ARG NODE_IMAGE=node:20-bookworm-slim
ARG VLLM_IMAGE=vllm/vllm-openai:latest

# ---- build: compile TypeScript, keep production dependencies only
FROM ${NODE_IMAGE} AS build
WORKDIR /app
COPY package.json package-lock.json ./
RUN npm ci --no-audit --no-fund
COPY tsconfig.json tsconfig.build.json nest-cli.json ./
COPY src src
COPY tools tools
RUN npm run build && npm prune --omit=dev

# ---- manual: the service alone, for a vLLM that runs in another container or host
FROM ${NODE_IMAGE} AS manual
RUN apt-get update && apt-get install -y --no-install-recommends tini && rm -rf /var/lib/apt/lists/*
WORKDIR /app
ENV NODE_ENV=production
COPY --from=build /app/node_modules node_modules
COPY --from=build /app/dist dist
COPY package.json ./
COPY conf conf
USER node
EXPOSE 10002
# tini reaps orphans and forwards signals, so SIGTERM reaches the service and nothing lingers as a zombie.
ENTRYPOINT ["/usr/bin/tini", "--", "node", "dist/src/main.js"]
CMD ["-c", "conf/tide-vllm.yaml"]

# ---- default: vLLM's official image plus Node 20 and the service (auto-start)
FROM ${VLLM_IMAGE} AS runtime
COPY --from=build /usr/local/bin/node /usr/local/bin/node
RUN apt-get update && apt-get install -y --no-install-recommends tini && rm -rf /var/lib/apt/lists/*
WORKDIR /app
ENV NODE_ENV=production
COPY --from=build /app/node_modules node_modules
COPY --from=build /app/dist dist
COPY package.json ./
COPY conf conf
EXPOSE 10002
# The service is PID 1's only child (via tini) and leads vLLM's process group from there.
ENTRYPOINT ["/usr/bin/tini", "--", "node", "dist/src/main.js"]
CMD ["-c", "conf/tide-vllm.yaml"]
