// Fuzzes the chat-template interpreter (core/chat_template.h): the Jinja lexer and parser, and
// rendering with messages, as the gateway renders a chat request. Input: the template source, a
// NUL byte, then a JSON object {"messages": [...], "add_generation_prompt": bool, "extra": {...}}
// (the shape of the cases in tests/fixtures/chat_templates/*/cases.json). Without a valid JSON
// part, the template is rendered with one user message.
#include <cstddef>
#include <cstdint>

#include <nlohmann/json.hpp>

#include "core/chat_template.h"
#include "tests/fuzz/fuzz_common.h"

using nlohmann::ordered_json;

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  moemesh::fuzz::quiet_logs();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const auto [source, vars_text] = moemesh::fuzz::split_at_nul(moemesh::fuzz::as_text(data, size));
  auto tmpl = moemesh::ChatTemplate::parse(source);
  if (!tmpl) return 0;

  ordered_json vars = ordered_json::parse(vars_text, nullptr, /*allow_exceptions=*/false);
  if (vars.is_discarded() || !vars.is_object())
    vars = {{"messages", {{{"role", "user"}, {"content", "Hello!"}}}}};

  // The variables as they are: the interpreter's own view of arbitrary JSON values.
  (void)tmpl->render_ordered(vars);

  // As the gateway renders a chat request: special tokens, messages, add_generation_prompt,
  // extra variables (tools, enable_thinking, ...).
  moemesh::ChatTemplateConfig config;
  config.chat_template = *tmpl;
  config.special_tokens = {{"bos_token", "<s>"}, {"eos_token", "</s>"}};
  const ordered_json messages =
      vars.contains("messages") ? vars["messages"] : ordered_json::array();
  const bool add_generation_prompt = vars.contains("add_generation_prompt") &&
                                     vars["add_generation_prompt"].is_boolean() &&
                                     vars["add_generation_prompt"].get<bool>();
  const ordered_json extra =
      vars.contains("extra") && vars["extra"].is_object() ? vars["extra"] : ordered_json::object();
  (void)moemesh::apply_chat_template_ordered(config, messages, add_generation_prompt, extra);
  return 0;
}
