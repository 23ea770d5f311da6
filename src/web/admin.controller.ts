import { Body, Controller, Delete, Get, HttpCode, Param, Post, Query } from '@nestjs/common';
import { ApiOperation, ApiProperty, ApiQuery, ApiTags } from '@nestjs/swagger';
import { IsNotEmpty, IsString, Matches } from 'class-validator';
import { AppError } from '../domain/app-error';
import { LORA_NAME, LORA_NAME_RULE, SLEEP_LEVELS, type SleepLevel } from '../config/config.schema';
import { VLLMServerManager, isAsleep } from '../infrastructure/vllm-server.manager';
import { serviceStatus } from './health.controller';
import { TrafficGate } from './traffic.gate';

class LoadLoraDto {
  @ApiProperty({ example: 'sql-adapter' })
  @IsString({ message: 'name must be a string' })
  @Matches(LORA_NAME, { message: `name must be ${LORA_NAME_RULE}` })
  name: string;

  @ApiProperty({ example: '/models/adapters/sql' })
  @IsString({ message: 'path must be a string' })
  @IsNotEmpty({ message: 'path must not be empty' })
  path: string;
}

function parseLevel(raw: string | undefined, fallback: SleepLevel): SleepLevel {
  if (raw === undefined || raw === '') return fallback;
  const level = SLEEP_LEVELS.find((l) => String(l) === raw);
  if (level === undefined) throw AppError.invalid('level must be 1, 2 or 3', 'level');
  return level;
}

/** Operator actions on the supervised engine: each checks what it is asked, then makes one call into the supervisor. */
@ApiTags('admin')
@Controller('admin')
export class AdminController {
  constructor(
    private readonly manager: VLLMServerManager,
    private readonly gate: TrafficGate,
  ) {}

  /** While the service drains, vLLM must stay as it is: the requests in flight are finishing on it. */
  private refuseWhileDraining(): void {
    if (this.gate.isDraining) throw new AppError('SHUTTING_DOWN', 'the service is shutting down; vLLM is left as it is for the requests still finishing');
  }

  @Get('status')
  @ApiOperation({ summary: 'State, pid, uptime, restarts, sleep, LoRA adapters, last error, log file, argv' })
  status() {
    const s = this.manager.snapshot();
    return {
      ...serviceStatus(s, this.gate.isDraining), // status, state: as /health says them
      mode: s.mode,
      engine: s.engine,
      model: s.model,
      pid: s.pid,
      state_since: new Date(s.since).toISOString(),
      uptime_seconds: s.uptimeSeconds,
      restarts: s.restarts,
      died_asleep: s.diedAsleep,
      sleeping: isAsleep(s.state),
      sleep_level: s.sleepLevel,
      sleeps: s.sleeps,
      wakeups: s.wakeups,
      lora_adapters: s.loras,
      last_error: s.lastError,
      log_file: s.logFile,
      argv: s.argv,
    };
  }

  @Post('sleep')
  @HttpCode(200)
  @ApiQuery({ name: 'level', required: false, enum: SLEEP_LEVELS.map(String) })
  @ApiOperation({ summary: 'Put vLLM to sleep now (level: default vllm.sleep.level)' })
  async sleep(@Query('level') level?: string) {
    this.refuseWhileDraining();
    await this.manager.sleep(parseLevel(level, this.manager.configuredSleepLevel));
    return this.status();
  }

  @Post('wake_up')
  @HttpCode(200)
  @ApiOperation({ summary: 'Wake vLLM up now' })
  async wakeUp() {
    this.refuseWhileDraining();
    const { state } = this.manager.snapshot();
    if (!isAsleep(state)) throw new AppError('CONFLICT', `vLLM is not asleep (${state})`);
    await this.manager.wake();
    return this.status();
  }

  @Post('restart')
  @HttpCode(200)
  @ApiOperation({ summary: 'Restart vLLM; answers once the model is served again' })
  async restart() {
    this.refuseWhileDraining();
    await this.manager.restart();
    return this.status();
  }

  @Post('lora')
  @HttpCode(200)
  @ApiOperation({ summary: 'Load a LoRA adapter; it then appears on /v1/models and can be named as "model"' })
  async loadLora(@Body() body: LoadLoraDto) {
    this.refuseWhileDraining();
    await this.manager.loadLora(body.name, body.path);
    return { loaded: body.name, lora_adapters: this.manager.snapshot().loras };
  }

  @Delete('lora/:name')
  @ApiOperation({ summary: 'Unload a LoRA adapter' })
  async unloadLora(@Param('name') name: string) {
    this.refuseWhileDraining();
    await this.manager.unloadLora(name);
    return { unloaded: name, lora_adapters: this.manager.snapshot().loras };
  }
}
