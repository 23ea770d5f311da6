import { type DynamicModule, Module } from '@nestjs/common';
import { ConfigModule } from '@nestjs/config';
import { APP_FILTER, APP_PIPE } from '@nestjs/core';
import { LoggerModule } from 'nestjs-pino';
import type { TideConfig } from './config/config.schema';
import { ApplicationModule } from './application/application.module';
import { InfrastructureModule } from './infrastructure/infrastructure.module';
import { AppErrorFilter } from './web/app-error.filter';
import { loggerOptions } from './web/logging';
import { requestValidationPipe } from './web/validation';
import { WebModule } from './web/web.module';

@Module({})
export class AppModule {
  /** The root module for an already validated configuration. */
  static forRoot(config: TideConfig): DynamicModule {
    return {
      module: AppModule,
      imports: [
        ConfigModule.forRoot({ isGlobal: true, ignoreEnvFile: true, load: [() => ({ ...config })] }),
        LoggerModule.forRoot(loggerOptions(config)),
        InfrastructureModule,
        ApplicationModule,
        WebModule,
      ],
      providers: [
        { provide: APP_FILTER, useClass: AppErrorFilter },
        { provide: APP_PIPE, useFactory: requestValidationPipe },
      ],
    };
  }
}
