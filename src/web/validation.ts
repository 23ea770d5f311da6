import { type ArgumentMetadata, ValidationPipe, type ValidationError } from '@nestjs/common';
import { AppError } from '../domain/app-error';
import { isObject, notAnObject } from './json-body';

/** `messages` sent to the simple API: an OpenAI chat body, meant for the relay. */
const MESSAGES_HINT = ' (the simple API takes "prompt"; an OpenAI chat body with "messages" goes to /v1/chat/completions)';

function messages(errors: ValidationError[], prefix = ''): string[] {
  return errors.flatMap((error) => {
    const path = prefix + error.property;
    const own = Object.entries(error.constraints ?? {}).map(([name, message]) =>
      name === 'whitelistValidation' ? `unknown field "${path}"${path === 'messages' ? MESSAGES_HINT : ''}` : message,
    );
    return [...own, ...messages(error.children ?? [], `${path}.`)];
  });
}

/** JSON.parse copes with any nesting, but recursive code after it (validation, stringify) does not. */
export const TOO_DEEP = AppError.invalid('request body is nested too deeply');

/** A body must be a JSON object before its fields can be judged. */
class RequestValidationPipe extends ValidationPipe {
  override async transform(value: unknown, metadata: ArgumentMetadata): Promise<unknown> {
    if (metadata.type === 'body' && !isObject(value)) throw notAnObject(value);
    // Keys named like Object.prototype's members (constructor, toString…) slip past class-transformer
    // and the whitelist; no DTO has such a field.
    if (metadata.type === 'body') {
      const inherited = Object.keys(value as object).find((key) => key in Object.prototype);
      if (inherited !== undefined) throw AppError.invalid(`unknown field "${inherited}"`, inherited);
    }
    try {
      return await super.transform(value, metadata);
    } catch (err) {
      if (err instanceof RangeError) throw TOO_DEEP; // stack overflow in class-transformer's recursion
      throw err;
    }
  }
}

/**
 * Validates request bodies against their DTO: wrong types and unknown fields are a 400 that
 * names every offending field (the first problem of each). Values are never coerced ("5" is not a number).
 */
export function requestValidationPipe(): ValidationPipe {
  return new RequestValidationPipe({
    stopAtFirstError: true,
    whitelist: true,
    forbidNonWhitelisted: true,
    forbidUnknownValues: true,
    transform: true,
    transformOptions: { enableImplicitConversion: false },
    validationError: { target: false, value: false },
    exceptionFactory: (errors) => {
      const found = [...new Set(messages(errors))];
      return AppError.invalid(found.join('; '), errors[0]?.property);
    },
  });
}
