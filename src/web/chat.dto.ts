import { ApiProperty, ApiPropertyOptional } from '@nestjs/swagger';
import { IsArray, IsDefined, IsBoolean, IsInt, IsNotEmpty, IsNumber, IsOptional, IsString, Matches, Max, Min, ValidateBy } from 'class-validator';
import { REQUEST_ID, REQUEST_ID_RULE } from './logging';

/** top_p is in (0, 1]: 0 itself is not allowed, as in vLLM. */
const IsTopP = () =>
  ValidateBy(
    { name: 'isTopP', validator: { validate: (v: unknown) => typeof v === 'number' && v > 0 && v <= 1 } },
    { message: 'top_p must be a number greater than 0 and at most 1' },
  );

class SamplingDto {
  @ApiPropertyOptional({
    description: `Request id (${REQUEST_ID_RULE}); wins over the X-Request-Id header; sent to vLLM and echoed in X-Request-Id. Default: the header's, else a fresh one`,
    minLength: 1,
    maxLength: 1024,
    pattern: REQUEST_ID.source,
    nullable: true,
  })
  @IsOptional()
  @IsString({ message: 'request_id must be a string' })
  @Matches(REQUEST_ID, { message: `request_id must be ${REQUEST_ID_RULE}` })
  request_id?: string;

  @ApiPropertyOptional({
    type: 'integer',
    minimum: 1,
    nullable: true,
    description:
      'Most tokens to generate, at most vllm.max_model_len less the prompt; default vllm.max_tokens (when the prompt leaves it no room, vLLM generates what fits)',
  })
  @IsOptional()
  @Min(1, { message: 'max_tokens must be at least 1' })
  @IsInt({ message: 'max_tokens must be an integer' }) // the bottom rule runs first: type before range
  max_tokens?: number;

  @ApiPropertyOptional({ minimum: 0, maximum: 2, nullable: true, description: 'default vllm.temperature' })
  @IsOptional()
  @Min(0, { message: 'temperature must be from 0 to 2' })
  @Max(2, { message: 'temperature must be from 0 to 2' })
  @IsNumber({ allowNaN: false, allowInfinity: false }, { message: 'temperature must be a number' })
  temperature?: number;

  @ApiPropertyOptional({ exclusiveMinimum: true, minimum: 0, maximum: 1, nullable: true, description: 'default vllm.top_p' })
  @IsOptional()
  @IsTopP()
  top_p?: number;

  @ApiPropertyOptional({ nullable: true, description: 'Stream the answer as server-sent events' })
  @IsOptional()
  @IsBoolean({ message: 'stream must be true or false' })
  stream?: boolean;
}

/** A prompt plus sampling parameters: what both simple APIs share. */
class PromptDto extends SamplingDto {
  @ApiProperty({ description: 'The user message (not only whitespace)', example: 'What is the capital of France?', minLength: 1, pattern: '\\S' })
  @IsDefined({ message: 'prompt is required' })
  @IsString({ message: 'prompt must be a string' })
  @IsNotEmpty({ message: 'prompt must not be empty' })
  prompt: string;
}

/** The simple chat API: a prompt and an optional system prompt. */
export class ChatRequestDto extends PromptDto {
  @ApiPropertyOptional({ nullable: true, description: 'System message; default vllm.system_prompt; "" for none' })
  @IsOptional()
  @IsString({ message: 'system_prompt must be a string' })
  system_prompt?: string;
}

/** POST /generate: a prompt with earlier turns as two lists of equal length. */
export class GenerateRequestDto extends PromptDto {
  @ApiPropertyOptional({ nullable: true, description: 'System message; default vllm.system_prompt; "" for none' })
  @IsOptional()
  @IsString({ message: 'system_info must be a string' })
  system_info?: string;

  @ApiPropertyOptional({ type: [String], nullable: true, description: 'Earlier user messages, oldest first; as many as history_output' })
  @IsOptional()
  @IsArray({ message: 'history_input must be a list of strings' })
  @IsString({ each: true, message: 'history_input must be a list of strings' })
  history_input?: string[];

  @ApiPropertyOptional({ type: [String], nullable: true, description: 'Earlier assistant answers, one per history_input item (lists of different lengths are a 400)' })
  @IsOptional()
  @IsArray({ message: 'history_output must be a list of strings' })
  @IsString({ each: true, message: 'history_output must be a list of strings' })
  history_output?: string[];
}
