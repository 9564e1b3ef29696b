// Chat templates: renders a model's Hugging Face chat template (a Jinja2 template) exactly as
// transformers' tokenizer.apply_chat_template(..., tokenize=False) does.
//
// The interpreter (core/detail/jinja_*.h) implements the subset of Jinja2 that real chat templates
// use, with Jinja2's whitespace control as transformers configures it (trim_blocks,
// lstrip_blocks), Jinja2's scoping, Python's semantics for values (str/repr of numbers and
// containers, truthiness, int vs float arithmetic, strings indexed by code point) and the rules
// of transformers' ImmutableSandboxedEnvironment: a missing attribute is undefined and prints
// nothing; lists and dicts cannot be modified; namespace() is the only mutable object. It has
// transformers' additions: tojson (json.dumps with ensure_ascii, indent, separators, sort_keys),
// raise_exception, strftime_now, dict, namespace, {% break %}, {% continue %}, {% generation %}.
//
// Supported
//   syntax   {{ }}, {% %}, {# #}, the - and + whitespace controls, {% raw %}, if/elif/else, for
//            (else, an `if` filter, tuple targets, loop.index/index0/revindex/revindex0/first/
//            last/length/previtem/nextitem/depth/cycle()/changed()), set (names, tuples, ns.attr,
//            block set with filters), macro (defaults, varargs, kwargs, caller), call, filter,
//            with, print; all of Jinja2's operators, literals, slices, conditional expressions.
//   filters  abs attr capitalize center count d default dictsort e escape first float
//            forceescape format indent int items join last length list lower map max min reject
//            rejectattr replace reverse round safe select selectattr sort string sum title tojson
//            trim truncate unique upper wordcount
//   tests    boolean callable defined divisibleby eq equalto escaped even false filter float ge
//            gt greaterthan in integer iterable le lower lt lessthan mapping ne none number odd
//            sameas sequence string test true undefined upper == != < <= > >=
//   methods  str: strip lstrip rstrip split rsplit splitlines startswith endswith upper lower
//            title capitalize replace find rfind index rindex count join format isdigit isalpha
//            isalnum isspace isupper islower isnumeric isdecimal removeprefix removesuffix center
//            ljust rjust zfill; dict: get items keys values copy; list: count index copy
//            (append, pop, update, ... raise the sandbox's SecurityError when called)
//
// Refused by parse(), naming the construct and its line: {% extends %}, {% block %},
// {% include %}, {% import %}, {% from %}, {% autoescape %}, recursive loops, the filters batch
// filesizeformat groupby pprint random slice striptags urlencode urlize wordwrap xmlattr, unknown
// filters, tests and methods, and calls of names that are neither builtins nor macros or
// variables of the template.
//
// Known differences from Python: integers are 64-bit (an overflow is an error, not a big int);
// keys of dicts built by a template must be strings; printing what Python prints with a memory
// address (a function, a generator such as `x|map(...)` without `|list`) is an error, as is a
// render beyond 2,000,000 loop iterations and macro calls, 100 nested macro calls or 256 MiB.
#pragma once

#include <filesystem>
#include <map>
#include <memory>
#include <string>
#include <string_view>

#include <nlohmann/json.hpp>

#include "core/error.h"

namespace moemesh {

namespace jinja {
struct TemplateAst;
}

// A parsed chat template. Immutable after parse; copies share the parsed tree; render() may be
// called from several threads at once.
class ChatTemplate {
 public:
  // An empty template (renders "").
  ChatTemplate();

  // Parses Jinja source. Anything this implementation does not support (a tag, filter, test, method
  // or operator) is an error here, naming it and its line, never a wrong render later.
  static Expected<ChatTemplate> parse(std::string_view source);

  // Renders with the given variables (a JSON object: messages, add_generation_prompt, tools,
  // bos_token, eos_token, ... ). Runtime errors (raise_exception(...) in the template, a type
  // error) are returned as Errors with the template's message.
  //
  // Objects keep the key order of the JSON type: nlohmann::json sorts keys, so `tojson` of a
  // variable prints sorted keys; render_ordered keeps the order of the request (what Python's dicts
  // keep).
  Expected<std::string> render(const nlohmann::json& variables) const;
  Expected<std::string> render_ordered(const nlohmann::ordered_json& variables) const;

  const std::string& source() const { return *source_; }

 private:
  friend struct ChatTemplateAccess;  // apply_chat_template renders prepared values

  std::shared_ptr<const jinja::TemplateAst> ast_;
  std::shared_ptr<const std::string> source_;
};

// A model directory's chat template and the special tokens transformers passes to it: the template
// comes from chat_template.jinja if present (transformers 5 saves it there), else from
// tokenizer_config.json "chat_template" (a string, or a list of {"name","template"} where "default"
// is used); bos_token/eos_token/unk_token/pad_token from tokenizer_config.json (a string or an
// AddedToken object {"content": ...}).
struct ChatTemplateConfig {
  ChatTemplate chat_template;
  nlohmann::json special_tokens;  // {"bos_token": "...", "eos_token": "...", ...} (strings)
  // Every named template of the model ("default" included), from the list form of
  // tokenizer_config.json or from additional_chat_templates/<name>.jinja. transformers renders
  // "tool_use", when present, for a request with tools.
  std::map<std::string, ChatTemplate> named_templates;
};

// Reads model_dir/chat_template.jinja, model_dir/additional_chat_templates/*.jinja and
// model_dir/tokenizer_config.json (also the legacy special_tokens_map.json, which transformers
// merges when tokenizer_config.json has no "added_tokens_decoder"). The special tokens are those
// transformers passes: bos, eos, unk, sep, pad, cls and mask tokens that are set.
Expected<ChatTemplateConfig> load_chat_template(const std::filesystem::path& model_dir);

// apply_chat_template(messages, add_generation_prompt, tools): merges the special tokens, the
// messages, add_generation_prompt and `extra` (e.g. tools, enable_thinking) as transformers does.
// As transformers 5 does, message keys whose value is null are dropped, and a message's reasoning
// (reasoning_content, thinking or reasoning) is passed as both reasoning_content and thinking.
// `tools` and `documents` are always defined (null when not given). Keys of `extra` that are
// parameters of transformers' apply_chat_template rather than template variables
// (continue_final_message, tokenize, chat_template, ...) are refused.
Expected<std::string> apply_chat_template(const ChatTemplateConfig& config,
                                          const nlohmann::json& messages,
                                          bool add_generation_prompt,
                                          const nlohmann::json& extra = nlohmann::json::object());
// The same with ordered JSON, which keeps the key order of messages and tools as the request has it
// (nlohmann::json sorts keys, so `tojson` of a tool would print its keys sorted, unlike
// transformers). A server should parse requests as ordered_json and use this.
Expected<std::string> apply_chat_template_ordered(
    const ChatTemplateConfig& config, const nlohmann::ordered_json& messages,
    bool add_generation_prompt,
    const nlohmann::ordered_json& extra = nlohmann::ordered_json::object());

}  // namespace moemesh
