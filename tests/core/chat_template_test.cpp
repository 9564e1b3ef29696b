// Tests of the chat-template interpreter (core/chat_template.h).
//
// The fixtures under tests/fixtures/chat_templates/ were made by
// tools/make_chat_template_fixtures.py: each family's tokenizer_config.json and, in cases.json, the
// exact strings transformers' apply_chat_template renders (or the error it raises). The focused
// interpreter cases below carry the output of Jinja2 3.1.6 in transformers' sandboxed environment.
#include "core/chat_template.h"

#include <gtest/gtest.h>
#include <pthread.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <thread>
#include <vector>

namespace moemesh {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;
using nlohmann::ordered_json;

const fs::path kFixtures = fs::path(MOEMESH_SOURCE_DIR) / "tests/fixtures/chat_templates";

bool contains(const std::string& haystack, const std::string& needle) {
  return haystack.find(needle) != std::string::npos;
}

ordered_json read_json(const fs::path& path) {
  std::ifstream in(path);
  EXPECT_TRUE(in.good()) << "cannot read " << path;
  return ordered_json::parse(in, nullptr, /*allow_exceptions=*/false);
}

// Renders `source` with `vars` (JSON text); "ERROR: <message>" when parse or render fails.
std::string render(const std::string& source, const std::string& vars = "{}") {
  Expected<ChatTemplate> t = ChatTemplate::parse(source);
  if (!t) return "ERROR: " + t.error().message();
  Expected<std::string> out = t->render_ordered(ordered_json::parse(vars));
  return out ? *out : "ERROR: " + out.error().message();
}

std::string parse_error(const std::string& source) {
  Expected<ChatTemplate> t = ChatTemplate::parse(source);
  EXPECT_FALSE(t.ok()) << "parsed: " << source;
  return t ? "" : t.error().message();
}

std::string render_error(const std::string& source, const std::string& vars = "{}") {
  Expected<ChatTemplate> t = ChatTemplate::parse(source);
  EXPECT_TRUE(t.ok()) << source << ": " << (t ? "" : t.error().message());
  if (!t) return "";
  Expected<std::string> out = t->render_ordered(ordered_json::parse(vars));
  EXPECT_FALSE(out.ok()) << "rendered: " << source << " -> " << (out ? *out : "");
  return out ? "" : out.error().message();
}

// A scratch directory for model-directory tests, removed afterwards.
class TempDir {
 public:
  TempDir() {
    static int n = 0;
    path_ = fs::temp_directory_path() /
            ("moemesh_chat_template_" + std::to_string(::getpid()) + "_" + std::to_string(n++));
    fs::remove_all(path_);
    fs::create_directories(path_);
  }
  ~TempDir() { fs::remove_all(path_); }
  const fs::path& path() const { return path_; }
  void write(const std::string& name, const std::string& text) const {
    fs::create_directories((path_ / name).parent_path());
    std::ofstream(path_ / name) << text;
  }

 private:
  fs::path path_;
};

// ---- transformers' renders of real chat templates -----------------------------------------------

// Checks every case of a fixture directory; returns how many were checked.
int check_cases(const fs::path& dir, bool plain_json = false) {
  Expected<ChatTemplateConfig> config = load_chat_template(dir);
  EXPECT_TRUE(config.ok()) << (config ? "" : config.error().message());
  if (!config) return 0;
  const ordered_json cases = read_json(dir / "cases.json");
  int n = 0;
  for (const ordered_json& c : cases.at("cases")) {
    SCOPED_TRACE(dir.filename().string() + "/" + c.at("name").get<std::string>());
    const ordered_json& messages = c.at("messages");
    const bool agp = c.at("add_generation_prompt").get<bool>();
    Expected<std::string> out =
        plain_json ? apply_chat_template(*config, json(messages), agp, json(c.at("extra")))
                   : apply_chat_template_ordered(*config, messages, agp, c.at("extra"));
    if (c.contains("expected")) {
      EXPECT_TRUE(out.ok()) << out.error().message();
      if (out) {
        EXPECT_EQ(*out, c.at("expected").get<std::string>());
      }
    } else {
      EXPECT_FALSE(out.ok()) << "rendered: " << *out;
      if (!out) {
        EXPECT_TRUE(contains(out.error().message(), c.at("error").get<std::string>()))
            << out.error().message();
      }
    }
    ++n;
  }
  return n;
}

class ChatTemplateFamily : public testing::TestWithParam<std::string> {};

TEST_P(ChatTemplateFamily, RendersEveryStoredCaseLikeTransformers) {
  const fs::path dir = kFixtures / GetParam();
  ASSERT_TRUE(fs::is_directory(dir)) << dir;
  EXPECT_GE(check_cases(dir), 8);
}

INSTANTIATE_TEST_SUITE_P(Fixtures, ChatTemplateFamily,
                         testing::Values("mixtral", "mixtral_legacy", "qwen2", "qwen2_5", "qwen3",
                                         "olmoe", "deepseek_v3", "kimi_k2"));

// Templates that never print a dict with tojson render the same from nlohmann::json (sorted keys).
TEST(ChatTemplateFixtures, PlainJsonApiMatchesWhereKeyOrderCannotShow) {
  for (const char* family : {"mixtral", "mixtral_legacy", "qwen2", "olmoe", "deepseek_v3"}) {
    EXPECT_GE(check_cases(kFixtures / family, /*plain_json=*/true), 8) << family;
  }
}

TEST(ChatTemplateFixtures, RaiseExceptionReturnsTheTemplatesMessage) {
  Expected<ChatTemplateConfig> legacy = load_chat_template(kFixtures / "mixtral_legacy");
  ASSERT_TRUE(legacy.ok()) << legacy.error().message();
  const json two_users = json::parse(R"([{"role": "user", "content": "a"},
                                         {"role": "user", "content": "b"}])");
  Expected<std::string> out = apply_chat_template(*legacy, two_users, true);
  ASSERT_FALSE(out.ok());
  EXPECT_TRUE(contains(out.error().message(),
                       "Conversation roles must alternate user/assistant/user/assistant/..."))
      << out.error().message();
  EXPECT_TRUE(contains(out.error().message(), "line 1")) << out.error().message();

  Expected<ChatTemplateConfig> mixtral = load_chat_template(kFixtures / "mixtral");
  ASSERT_TRUE(mixtral.ok());
  out = apply_chat_template(*mixtral, two_users, true);
  ASSERT_FALSE(out.ok());
  EXPECT_TRUE(contains(out.error().message(), "conversation roles must alternate"));
  EXPECT_TRUE(contains(out.error().message(), "line 11")) << out.error().message();
}

// ---- model directories ------------------------------------------------------------------------

TEST(ChatTemplateLoad, TokenizerConfigStringAndSpecialTokens) {
  Expected<ChatTemplateConfig> c = load_chat_template(kFixtures / "mixtral");
  ASSERT_TRUE(c.ok()) << c.error().message();
  EXPECT_EQ(c->special_tokens,
            json({{"bos_token", "<s>"}, {"eos_token", "</s>"}, {"unk_token", "<unk>"}}));
  EXPECT_EQ(c->named_templates.size(), 1u);
  EXPECT_TRUE(contains(c->chat_template.source(), "raise_exception"));
}

TEST(ChatTemplateLoad, AddedTokenObjects) {
  Expected<ChatTemplateConfig> c = load_chat_template(kFixtures / "deepseek_v3");
  ASSERT_TRUE(c.ok()) << c.error().message();
  EXPECT_EQ(c->special_tokens["bos_token"], "<｜begin▁of▁sentence｜>");
  EXPECT_EQ(c->special_tokens["eos_token"], "<｜end▁of▁sentence｜>");
  EXPECT_FALSE(c->special_tokens.contains("unk_token"));  // null in the config
}

TEST(ChatTemplateLoad, ChatTemplateJinjaFileWinsOverTokenizerConfig) {
  const fs::path dir = kFixtures / "_forms/jinja_file";
  Expected<ChatTemplateConfig> c = load_chat_template(dir);
  ASSERT_TRUE(c.ok()) << c.error().message();
  EXPECT_TRUE(contains(c->chat_template.source(), "JINJA FILE"));
  EXPECT_EQ(check_cases(dir), 2);
}

TEST(ChatTemplateLoad, ListOfNamedTemplatesUsesDefaultAndToolUse) {
  const fs::path dir = kFixtures / "_forms/named_list";
  Expected<ChatTemplateConfig> c = load_chat_template(dir);
  ASSERT_TRUE(c.ok()) << c.error().message();
  EXPECT_TRUE(contains(c->chat_template.source(), "DEFAULT"));
  EXPECT_EQ(c->named_templates.count("tool_use"), 1u);
  EXPECT_EQ(c->special_tokens["bos_token"], "<bos>");
  EXPECT_EQ(check_cases(dir), 2);
}

TEST(ChatTemplateLoad, AdditionalChatTemplatesDirectory) {
  const fs::path dir = kFixtures / "_forms/additional_templates";
  Expected<ChatTemplateConfig> c = load_chat_template(dir);
  ASSERT_TRUE(c.ok()) << c.error().message();
  EXPECT_EQ(c->named_templates.size(), 2u);
  EXPECT_EQ(check_cases(dir), 2);
}

TEST(ChatTemplateLoad, LegacySpecialTokensMapIsMergedAsTransformersDoes) {
  const fs::path dir = kFixtures / "_forms/legacy_special_tokens_map";
  Expected<ChatTemplateConfig> c = load_chat_template(dir);
  ASSERT_TRUE(c.ok()) << c.error().message();
  EXPECT_EQ(c->special_tokens, json({{"bos_token", "<s>"},
                                     {"eos_token", "<|end|>"},
                                     {"pad_token", "<pad>"},
                                     {"mask_token", "<mask>"}}));
  EXPECT_EQ(check_cases(dir), 1);
}

TEST(ChatTemplateLoad, ErrorsNameTheFileAndField) {
  {
    Expected<ChatTemplateConfig> c = load_chat_template("/nonexistent/model/dir");
    ASSERT_FALSE(c.ok());
    EXPECT_TRUE(contains(c.error().message(), "/nonexistent/model/dir"));
  }
  {
    TempDir d;
    d.write("tokenizer_config.json", R"({"bos_token": "<s>"})");
    Expected<ChatTemplateConfig> c = load_chat_template(d.path());
    ASSERT_FALSE(c.ok());
    EXPECT_TRUE(contains(c.error().message(), "no chat template")) << c.error().message();
  }
  {
    TempDir d;
    d.write("tokenizer_config.json", "{not json");
    Expected<ChatTemplateConfig> c = load_chat_template(d.path());
    ASSERT_FALSE(c.ok());
    EXPECT_TRUE(contains(c.error().message(), "tokenizer_config.json: not valid JSON"));
  }
  {
    TempDir d;
    d.write("tokenizer_config.json", R"({"chat_template": 5})");
    Expected<ChatTemplateConfig> c = load_chat_template(d.path());
    ASSERT_FALSE(c.ok());
    EXPECT_TRUE(contains(c.error().message(), "\"chat_template\"")) << c.error().message();
  }
  {
    TempDir d;
    d.write("tokenizer_config.json",
            R"({"chat_template": [{"name": "tool_use", "template": "x"}]})");
    Expected<ChatTemplateConfig> c = load_chat_template(d.path());
    ASSERT_FALSE(c.ok());
    EXPECT_TRUE(contains(c.error().message(), "\"default\"")) << c.error().message();
  }
  {
    TempDir d;
    d.write("tokenizer_config.json", R"({"chat_template": "x", "eos_token": 7})");
    Expected<ChatTemplateConfig> c = load_chat_template(d.path());
    ASSERT_FALSE(c.ok());
    EXPECT_TRUE(contains(c.error().message(), "\"eos_token\"")) << c.error().message();
  }
  {
    TempDir d;
    d.write("chat_template.jinja", "{% for m in messages %}\n{{ m | nosuchfilter }}");
    Expected<ChatTemplateConfig> c = load_chat_template(d.path());
    ASSERT_FALSE(c.ok());
    EXPECT_TRUE(contains(c.error().message(), "nosuchfilter")) << c.error().message();
    EXPECT_TRUE(contains(c.error().message(), "chat_template.jinja")) << c.error().message();
    EXPECT_TRUE(contains(c.error().message(), "line 2")) << c.error().message();
  }
}

TEST(ChatTemplateApply, RefusesBadArguments) {
  Expected<ChatTemplateConfig> c = load_chat_template(kFixtures / "qwen2_5");
  ASSERT_TRUE(c.ok());
  const json hello = json::parse(R"([{"role": "user", "content": "hi"}])");
  auto error = [&](const json& messages, const json& extra) {
    Expected<std::string> out = apply_chat_template(*c, messages, true, extra);
    EXPECT_FALSE(out.ok());
    return out ? std::string() : out.error().message();
  };
  EXPECT_TRUE(contains(error(json::array(), json::object()), "empty conversation"));
  EXPECT_TRUE(contains(error(json::object(), json::object()), "array"));
  EXPECT_TRUE(contains(error(json::parse("[1]"), json::object()), "message 0"));
  EXPECT_TRUE(contains(error(hello, {{"continue_final_message", true}}), "continue_final_message"));
  EXPECT_TRUE(contains(error(hello, {{"tools", "x"}}), "tools"));
  EXPECT_TRUE(contains(error(hello, {{"tools", {1}}}), "tool"));
  EXPECT_TRUE(contains(error(hello, {{"messages", hello}}), "messages"));
}

TEST(ChatTemplateApply, ExtraVariablesAndSpecialTokensReachTheTemplate) {
  ChatTemplateConfig c;
  c.chat_template = *ChatTemplate::parse(
      "{{ bos_token }}|{{ flag }}|{{ tools }}|{{ documents }}|{{ add_generation_prompt }}|"
      "{{ messages[0].keys()|list }}|{{ eos_token }}");
  c.special_tokens = {{"bos_token", "<s>"}, {"eos_token", "</s>"}};
  const ordered_json msgs = ordered_json::parse(
      R"([{"role": "assistant", "content": "x", "name": null, "reasoning": "r"}])");
  Expected<std::string> out =
      apply_chat_template_ordered(c, msgs, false, {{"flag", 1}, {"eos_token", "E"}});
  ASSERT_TRUE(out.ok()) << out.error().message();
  EXPECT_EQ(*out,
            "<s>|1|None|None|False|['thinking', 'role', 'content', 'reasoning', "
            "'reasoning_content']|E");
}

// ---- what the interpreter refuses -------------------------------------------------------------

TEST(ChatTemplateParse, UnsupportedConstructsFailAtParseNamingThemAndTheirLine) {
  const ordered_json u = read_json(kFixtures / "unsupported.json");
  int n = 0;
  for (const ordered_json& t : u.at("templates")) {
    SCOPED_TRACE(t.at("name").get<std::string>());
    const std::string message = parse_error(t.at("template").get<std::string>());
    for (const auto& needle : t.at("error_contains"))
      EXPECT_TRUE(contains(message, needle.get<std::string>())) << message;
    ++n;
  }
  EXPECT_GE(n, 15);
}

TEST(ChatTemplateParse, MalformedTemplatesFailWithAMessage) {
  for (const char* source : {"{% if %}",
                             "{% for %}",
                             "{% for x in %}{% endfor %}",
                             "{{ }}",
                             "{{ a.}}",
                             "{{ a[ }}",
                             "{{ f(a=) }}",
                             "{% set %}",
                             "{% macro %}",
                             "{% endif %}",
                             "{% else %}",
                             "{{ 'a' 'b }}",
                             "{{ 1 +* 2 }}",
                             "{%",
                             "{{",
                             "{#",
                             "{% if x %}{% elif %}{% endif %}",
                             "{{ x is }}",
                             "{{ x | }}",
                             "{% set x = %}",
                             "{% macro m(a=1, b) %}{% endmacro %}",
                             "{% for x in y %}{% endif %}",
                             "{% break %}",
                             "{{ )( }}",
                             "{{ [1, 2 }}",
                             "{{ {1: } }}",
                             "{{ 99999999999999999999 }}",
                             "{{ '\\x4' }}"}) {
    SCOPED_TRACE(source);
    const std::string message = parse_error(source);
    EXPECT_TRUE(contains(message, "line ")) << message;
  }
}

TEST(ChatTemplateParse, EveryPrefixOfARealTemplateParsesOrFailsCleanly) {
  Expected<ChatTemplateConfig> c = load_chat_template(kFixtures / "qwen3");
  ASSERT_TRUE(c.ok());
  const std::string source = c->chat_template.source();
  const ordered_json vars = ordered_json::parse(
      R"({"messages": [{"role": "user", "content": "hi"}], "add_generation_prompt": true})");
  int parsed = 0;
  for (size_t n = 0; n <= source.size(); n += 7) {
    Expected<ChatTemplate> t = ChatTemplate::parse(source.substr(0, n));
    if (!t) continue;
    ++parsed;
    (void)t->render_ordered(vars);  // may fail; must not crash
  }
  EXPECT_GT(parsed, 0);
}

TEST(ChatTemplateParse, DeepNestingIsRefusedNotACrash) {
  EXPECT_TRUE(
      contains(parse_error("{{ " + std::string(5000, '(') + "1" + std::string(5000, ')') + " }}"),
               "nested"));
  std::string ifs;
  for (int i = 0; i < 2000; ++i) ifs += "{% if true %}";
  EXPECT_TRUE(contains(parse_error(ifs), "nested"));
  EXPECT_TRUE(contains(parse_error("{{ " + std::string(5000, '-') + "1 }}"), "nested"));
  EXPECT_TRUE(contains(parse_error("{{ " + std::string(3000, '[') + std::string(3000, ']') + " }}"),
                       "nested"));
}

// ---- runtime errors -----------------------------------------------------------------------------

TEST(ChatTemplateRender, MacroRecursionIsCappedNotACrash) {
  const std::string message =
      render_error("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}\n{{ f(0) }}");
  EXPECT_TRUE(contains(message, "macro calls nested more than")) << message;
  EXPECT_TRUE(contains(message, "'f'")) << message;
}

// A thread with a small stack (256 KiB) gets an error where the nesting caps alone would not
// keep the recursion within its stack.
TEST(ChatTemplateRender, DeepNestingOnASmallThreadStackIsAnErrorNotACrash) {
  struct Job {
    std::string macro_error, parse_error;
  } job;
  auto run = [](void* arg) -> void* {
    auto* j = static_cast<Job*>(arg);
    Expected<ChatTemplate> t = ChatTemplate::parse(
        "{% macro f(n) %}{% if true %}{% for i in [1] %}{{ (f(n + 1) ~ 'x')|trim }}{% endfor %}"
        "{% endif %}{% endmacro %}{{ f(0) }}");
    if (t) {
      Expected<std::string> out = t->render(json::object());
      j->macro_error = out ? "rendered" : out.error().message();
    }
    std::string ifs;
    for (int i = 0; i < 95; ++i) ifs += "{% if true %}{{ ((((((((((1)))))))))) }}";
    Expected<ChatTemplate> deep = ChatTemplate::parse(ifs);
    j->parse_error = deep ? "parsed" : deep.error().message();
    return nullptr;
  };
  pthread_attr_t attr;
  pthread_attr_init(&attr);
  pthread_attr_setstacksize(&attr, 256 * 1024);
  pthread_t thread;
  ASSERT_EQ(pthread_create(&thread, &attr, run, &job), 0);
  pthread_join(thread, nullptr);
  pthread_attr_destroy(&attr);
  EXPECT_TRUE(contains(job.macro_error, "nested")) << job.macro_error;
  EXPECT_TRUE(job.parse_error == "parsed" || contains(job.parse_error, "nested"))
      << job.parse_error;
}

TEST(ChatTemplateRender, RuntimeErrorsCarryTheMessageAndLine) {
  EXPECT_TRUE(contains(render_error("a\n{{ raise_exception('bad input: ' ~ x) }}", R"({"x": 3})"),
                       "chat template line 2: bad input: 3"));
  EXPECT_TRUE(
      contains(render_error("{{ 'a' + 1 }}"), "can only concatenate str (not \"int\") to str"));
  EXPECT_TRUE(contains(render_error("{{ m.content.x }}", R"({"m": {}})"),
                       "'dict object' has no attribute 'content'"));
  EXPECT_TRUE(contains(render_error("{{ u + 1 }}"), "'u' is undefined"));
  EXPECT_TRUE(contains(render_error("{{ 1 // 0 }}"), "division or modulo by zero"));
  EXPECT_TRUE(contains(render_error("{% set l = [] %}{{ l.append(1) }}"),
                       "access to attribute 'append' of 'list' object is unsafe"));
  EXPECT_TRUE(contains(render_error("{{ range(200000)|length }}"), "Range too big"));
  EXPECT_TRUE(contains(render_error("{{ x|tojson }}"), "not JSON serializable"));
  EXPECT_TRUE(contains(render_error("{{ 9223372036854775807 + 1 }}"), "overflow"));
  EXPECT_TRUE(
      contains(render_error("{% set ns = namespace() %}{% set ns._x = 1 %}"), "underscore"));
  EXPECT_TRUE(contains(render_error("{{ 'x' * 1000000000000 }}"), "too large"));
  for (const char* huge :
       {"{{ 'x'|center(999999999999) }}", "{{ '%999999999s' % 'a' }}",
        "{{ ('a' * 100000)|replace('', 'x' * 100000) }}", "{{ 'a\nb'|indent(999999999999) }}"})
    EXPECT_TRUE(contains(render_error(huge), "256 MiB")) << huge;
  EXPECT_TRUE(
      contains(render_error("{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}"
                            "{% endfor %}"),
               "loop iterations"));
  EXPECT_TRUE(contains(
      render_error("{{ [1, 2]|map('upper')|first }}{% set f = 'x' %}{{ [1]|map(f)|list }}"),
      "No filter named 'x'"));
}

TEST(ChatTemplateRender, VariablesMustBeAnObject) {
  Expected<ChatTemplate> t = ChatTemplate::parse("x");
  ASSERT_TRUE(t.ok());
  Expected<std::string> out = t->render(json::array());
  ASSERT_FALSE(out.ok());
  EXPECT_TRUE(contains(out.error().message(), "JSON object"));
  EXPECT_EQ(*t->render(json::object()), "x");
  EXPECT_EQ(*ChatTemplate().render(json::object()), "");
}

TEST(ChatTemplateRender, StrftimeNowFormatsTheCurrentDate) {
  const std::string year = render("{{ strftime_now('%Y') }}");
  ASSERT_EQ(year.size(), 4u) << year;
  EXPECT_GE(std::stoi(year), 2024);
}

TEST(ChatTemplateRender, ConcurrentRendersShareTheParsedTemplate) {
  Expected<ChatTemplateConfig> c = load_chat_template(kFixtures / "qwen3");
  ASSERT_TRUE(c.ok());
  const ordered_json msgs = ordered_json::parse(
      R"([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}])");
  const std::string expected = *apply_chat_template_ordered(*c, msgs, true);
  std::vector<std::thread> threads;
  std::vector<int> ok(4, 0);
  for (int t = 0; t < 4; ++t)
    threads.emplace_back([&, t] {
      for (int i = 0; i < 50; ++i)
        ok[t] += *apply_chat_template_ordered(*c, msgs, true) == expected;
    });
  for (auto& th : threads) th.join();
  for (int t = 0; t < 4; ++t) EXPECT_EQ(ok[t], 50);
}

// ---- focused interpreter cases (expected: Jinja2 3.1.6 in transformers' environment) ----------

struct Case {
  const char* group;
  const char* source;
  const char* vars;
  const char* expected;
};

const Case kCases[] = {
    {"whitespace", "a\n  {% if true %}\n    x\n  {% endif %}\nb\n", "{}", "a\n    x\nb"},
    {"whitespace", "a  {% if true %}x{% endif %}  b", "{}", "a  x  b"},
    {"whitespace", "{%- for i in [1,2] -%}\n  {{ i }}\n{%- endfor -%}\nend", "{}", "12end"},
    {"whitespace", "a  {{- 'x' -}}  b", "{}", "axb"},
    {"whitespace", "a\n  {{ 'x' }}  \nb", "{}", "a\n  x  \nb"},
    {"whitespace", "a\n  {%+ if true %}x{% endif %}", "{}", "a\n  x"},
    {"whitespace", "{# comment #}\nA\n  {# c2 #}\nB\n  {#- c3 -#}  C", "{}", "A\nBC"},
    {"whitespace", "x\n\n", "{}", "x\n"},
    {"whitespace", "x\r\ny\rz\n", "{}", "x\ny\nz"},
    {"whitespace", "  {% raw -%}  {{ a }}  {%- endraw %}\n  y", "{}", "{{ a }}  y"},
    {"whitespace", "a 　{%- if true %}b{% endif %}", "{}", "ab"},
    {"whitespace", "line1\n   {%- if true %}\n   y\n   {%- endif %}\n", "{}", "line1   y"},
    {"operators",
     "{{ 1 + 2 * 3 }} {{ 2 ** 3 ** 2 }} {{ -2 ** 2 }} {{ 7 % 3 }} {{ 7.5 // 2 }} {{ -7.5 % 2 }} {{ "
     "-7 // 2 }}",
     "{}", "7 64 4 1 3.0 0.5 -4"},
    {"operators",
     "{{ 1 / 3 }} {{ 10 / 4 }} {{ 2 ** -1 }} {{ 0.1 * 3 }} {{ 1e-7 }} {{ 1e16 }} {{ "
     "123456789012345678.0 }}",
     "{}", "0.3333333333333333 2.5 0.5 0.30000000000000004 1e-07 1e+16 1.2345678901234568e+17"},
    {"operators", "{{ 'a' ~ 1 ~ none ~ true ~ 1.5 ~ nothing }}", "{}", "a1NoneTrue1.5"},
    {"operators", "{{ 'ab' * 3 }} {{ [1] * 2 }} {{ [1, 2] + [3] }} {{ (1,) + (2,) }}", "{}",
     "ababab [1, 1] [1, 2, 3] (1, 2)"},
    {"operators",
     "{{ 1 < 2 < 3 }} {{ 3 > 2 > 2 }} {{ 1 == 1.0 }} {{ true == 1 }} {{ (1,2) == [1,2] }} {{ [1, "
     "2] < [1, 3] }}",
     "{}", "True False True True False True"},
    {"operators",
     "{{ 'a' in 'abc' }} {{ 1 in [1,2] }} {{ 'k' in {'k': 1} }} {{ 'z' not in 'abc' }} {{ 'x' in "
     "nothing }}",
     "{}", "True True True True False"},
    {"operators",
     "{{ true and 'x' }} {{ false or 'y' }} {{ none or 0 }} {{ 0 and 1 }} {{ not none }}", "{}",
     "x y 0 0 True"},
    {"operators", "{{ 'yes' if 1 else 'no' }} {{ 'yes' if 0 }}|{{ x if x is defined else 'd' }}",
     "{}", "yes |d"},
    {"literals",
     "{{ {'a': 1, 'b': [1, 'x']} }} {{ {} }} {{ () }} {{ (1,) }} {{ none }} {{ true }} {{ \"it's\" "
     "}}",
     "{}", "{'a': 1, 'b': [1, 'x']} {} () (1,) None True it's"},
    {"literals", "{{ ['it\\'s', \"q\\\"\", 'a\\nb', 'é', '\\x01', '\\u2028'] }}", "{}",
     "[\"it's\", 'q\"', 'a\\nb', 'é', '\\x01', '\\u2028']"},
    {"literals",
     "{{ 'a\\tb\\\\c\\x41\\u00e9\\101\\q' }} {{ 1_000 }} {{ 0x1F }} {{ 0b101 }} {{ 1.5e3 }}", "{}",
     "a\tb\\cAéA\\q 1000 31 5 1500.0"},
    {"literals", "{{ x }} {{ y }} {{ z }} {{ w }} {{ v }}",
     "{\"x\": 1.0, \"y\": 1e+22, \"z\": 1e-05, \"w\": 1234567890123456.8, \"v\": [1.0, {\"a\": "
     "null, \"b\": true}]}",
     "1.0 1e+22 1e-05 1234567890123456.8 [1.0, {'a': None, 'b': True}]"},
    {"subscripts",
     "{{ l[0] }} {{ l[-1] }} {{ l[5] }}|{{ s[1:3] }} {{ s[::-1] }} {{ l[::2] }} {{ l[-2:] }} {{ "
     "s[4:1:-1] }}",
     "{\"l\": [1, 2, 3, 4], \"s\": \"héllo\"}", "1 4 |él olléh [1, 3] [3, 4] oll"},
    {"subscripts",
     "{{ d.a }} {{ d['a'] }} {{ d.b.c }} {{ d['b']['c'] }} {{ d.zz }}|{{ n.attr }}|{{ d.get('zz', "
     "5) }}",
     "{\"d\": {\"a\": 1, \"b\": {\"c\": 2}}, \"n\": null}", "1 1 2 2 ||5"},
    {"loops",
     "{% for x in xs %}{{ loop.index }}{{ loop.index0 }}{{ loop.revindex }}{{ loop.revindex0 }}{{ "
     "loop.first }}{{ loop.last }}{{ loop.length }}|{% endfor %}",
     "{\"xs\": \"abc\"}", "1032TrueFalse3|2121FalseFalse3|3210FalseTrue3|"},
    {"loops", "{% for x in xs %}{{ loop.previtem }}-{{ loop.nextitem }};{% endfor %}",
     "{\"xs\": [1, 2, 3]}", "-2;1-3;2-;"},
    {"loops",
     "{% for x in xs %}{{ loop.cycle('a', 'b') }}{% if loop.changed(x % 2) %}!{% endif %}{% endfor "
     "%}",
     "{\"xs\": [1, 3, 2, 4, 5]}", "a!ba!ba!"},
    {"loops",
     "{% for x in [] %}a{% else %}empty{% endfor %} {% for x in [1,2,3] if x is odd %}{{ x }}{{ "
     "loop.length }}{% endfor %}",
     "{}", "empty 1232"},
    {"loops",
     "{% for x in [1,2,3,4] %}{% if x == 2 %}{% continue %}{% endif %}{% if x == 4 %}{% break %}{% "
     "endif %}{{ x }}{% endfor %}",
     "{}", "13"},
    {"loops",
     "{% for k, v in d.items() %}{{ k }}={{ v }},{% endfor %}{% for k in d %}{{ k }}{% endfor %}",
     "{\"d\": {\"z\": 1, \"a\": 2}}", "z=1,a=2,za"},
    {"loops",
     "{% for x in xs %}{% for y in ys %}{{ loop.index }}{{ x }}{{ y }} {% endfor %}{{ loop.index "
     "}}|{% endfor %}",
     "{\"xs\": [1, 2], \"ys\": \"ab\"}", "11a 21b 1|12a 22b 2|"},
    {"scoping", "{% set x = 1 %}{% for i in [1,2] %}{% set x = x + i %}{{ x }}{% endfor %}{{ x }}",
     "{}", "231"},
    {"scoping",
     "{% set ns = namespace(x=1, y='a') %}{% for i in [1,2] %}{% set ns.x = ns.x + i %}{% endfor "
     "%}{{ ns.x }}{{ ns.y }}{{ ns }}",
     "{}", "4a<Namespace {'x': 4, 'y': 'a'}>"},
    {"scoping",
     "{% set a, b = 1, 2 %}{{ a }}{{ b }}{% set c = 1, 2 %}{{ c }}{% set x %}in {{ a + b }}{% "
     "endset %}[{{ x }}]{% set y | upper %}up{% endset %}{{ y }}",
     "{}", "12(1, 2)[in 3]UP"},
    {"scoping",
     "{% with a = 1 %}{{ a }}{% endwith %}{{ a }}|{% if true %}{% set z = 6 %}{% endif %}{{ z }}",
     "{}", "1|6"},
    {"scoping",
     "{% macro m() %}{{ z }}{% endmacro %}{% set z = 1 %}{{ m() }}{% set z = 2 %}{{ m() }}{% for i "
     "in [1] %}{% set z = 3 %}{{ m() }}{% endfor %}",
     "{}", "122"},
    {"macros",
     "{% macro m(a, b='B', c=none) %}[{{ a }}{{ b }}{{ c }}]{% endmacro %}{{ m(1) }}{{ m(1, 2) "
     "}}{{ m(a=3, c=4) }}{{ m() }}",
     "{}", "[1BNone][12None][3B4][BNone]"},
    {"macros", "{% macro m() %}{{ varargs }}{{ kwargs }}{% endmacro %}{{ m(1, 2, x=3) }}", "{}",
     "(1, 2){'x': 3}"},
    {"macros",
     "{% macro m(x) %}<{{ caller(x) }}>{% endmacro %}{% call(y) m(5) %}c{{ y }}{% endcall %}", "{}",
     "<c5>"},
    {"macros",
     "{% macro fact(n) %}{% if n <= 1 %}1{% else %}{{ n * fact(n - 1)|int }}{% endif %}{% endmacro "
     "%}{{ fact(10) }}",
     "{}", "3628800"},
    {"macros", "{% filter upper %}abc {{ 'd' }}{% endfilter %}", "{}", "ABC D"},
    {"filters",
     "{{ '  x  '|trim }}|{{ 'xxaxx'|trim('x') }}|{{ 'AbC'|lower }}{{ 'abc'|upper }}|{{ 'hello "
     "world-foo(bar'|title }}|{{ 'hELLO'|capitalize }}",
     "{}", "x|a|abcABC|Hello World-Foo(Bar|Hello"},
    {"filters", "{{ [1,2,3]|length }}{{ 'héllo'|length }}{{ {'a':1}|count }}{{ nothing|length }}",
     "{}", "3510"},
    {"filters",
     "{{ x|tojson }}|{{ x|tojson(indent=2) }}|{{ x|tojson(sort_keys=true) }}|{{ "
     "x|tojson(ensure_ascii=true) }}|{{ x|tojson(separators=(',', ':')) }}",
     "{\"x\": {\"b\": [1, 2.0, null, true], \"a\": \"é\\\"\\\\\\n\\u0001😀\", \"c\": {}, \"d\": "
     "[]}}",
     "{\"b\": [1, 2.0, null, true], \"a\": \"é\\\"\\\\\\n\\u0001😀\", \"c\": {}, \"d\": []}|{\n  "
     "\"b\": [\n    1,\n    2.0,\n    null,\n    true\n  ],\n  \"a\": \"é\\\"\\\\\\n\\u0001😀\",\n  "
     "\"c\": {},\n  \"d\": []\n}|{\"a\": \"é\\\"\\\\\\n\\u0001😀\", \"b\": [1, 2.0, null, true], "
     "\"c\": {}, \"d\": []}|{\"b\": [1, 2.0, null, true], \"a\": "
     "\"\\u00e9\\\"\\\\\\n\\u0001\\ud83d\\ude00\", \"c\": {}, \"d\": "
     "[]}|{\"b\":[1,2.0,null,true],\"a\":\"é\\\"\\\\\\n\\u0001😀\",\"c\":{},\"d\":[]}"},
    {"filters",
     "{{ 'a,b'|replace(',', ';') }} {{ 'aaa'|replace('a', 'b', 2) }} {{ [1,2,3]|join(', ') }} {{ "
     "us|join(', ', attribute='name') }}",
     "{\"us\": [{\"name\": \"x\"}, {\"name\": \"y\"}]}", "a;b bba 1, 2, 3 x, y"},
    {"filters",
     "{{ [1,2,3]|first }} {{ [1,2,3]|last }} {{ 'abc'|first }} {{ []|first }}|{{ 'abc'|list }} {{ "
     "{'a': 1}|list }}",
     "{}", "1 3 a |['a', 'b', 'c'] ['a']"},
    {"filters",
     "{{ nothing|default('d') }} {{ none|default('d') }} {{ ''|default('d', true) }} {{ 0|d(5) }}",
     "{}", "d None d 0"},
    {"filters",
     "{% for k, v in {'b': 1, 'a': 2}|items %}{{ k }}{{ v }}{% endfor %} {% for k, v in {'b': 1, "
     "'a': 2}|dictsort %}{{ k }}{{ v }}{% endfor %}",
     "{}", "b1a2 a2b1"},
    {"filters",
     "{{ ms|selectattr('role', 'equalto', 'user')|list }} {{ ms|rejectattr('role', 'eq', "
     "'user')|map(attribute='content')|list }} {{ ms|map(attribute='x', default='?')|list }}",
     "{\"ms\": [{\"role\": \"system\", \"content\": \"s\"}, {\"role\": \"user\", \"content\": "
     "\"u\"}]}",
     "[{'role': 'user', 'content': 'u'}] ['s'] ['?', '?']"},
    {"filters",
     "{{ [1,2,3,4]|select('odd')|list }} {{ [1,2,3,4]|reject('even')|list }} {{ "
     "['a','B']|map('upper')|join }} {{ [1,2,3]|select('gt', 1)|list }}",
     "{}", "[1, 3] [1, 3] AB [2, 3]"},
    {"filters",
     "{{ '42'|int }} {{ '42.7'|int }} {{ 'x'|int }} {{ 'x'|int(7) }} {{ 3.9|int }} {{ "
     "'0x1A'|int(0, 16) }} {{ '1.5'|float }} {{ 2|float }}",
     "{}", "42 42 0 7 3 26 1.5 2.0"},
    {"filters",
     "{{ 'a\\nb\\n\\nc'|indent }}|{{ 'a\\nb'|indent(2, true) }}|{{ 'a\\n\\nb'|indent(2, "
     "blank=true) }}",
     "{}", "a\n    b\n\n    c|  a\n  b|a\n  \n  b"},
    {"filters", "{{ 'a<b>&\"\\''|e }} {{ '<x>'|safe }} {{ 5|string }} {{ [1]|string }}", "{}",
     "a&lt;b&gt;&amp;&#34;&#39; <x> 5 [1]"},
    {"filters",
     "{{ [3,1,2]|sort }} {{ [3,1,2]|sort(reverse=true) }} {{ ['b','A','c']|sort }} {{ "
     "us|sort(attribute='n')|map(attribute='n')|list }}",
     "{\"us\": [{\"n\": 2}, {\"n\": 1}]}", "[1, 2, 3] [3, 2, 1] ['A', 'b', 'c'] [1, 2]"},
    {"filters",
     "{{ [1,2,2,3,1]|unique|list }} {{ [3,1,2]|min }} {{ [3,1,2]|max }} {{ [1,2,3]|sum }} {{ "
     "[1.5,2]|sum }} {{ [1,2,3]|reverse|list }} {{ 'abc'|reverse }}",
     "{}", "[1, 2, 3] 1 3 6 3.5 [3, 2, 1] cba"},
    {"filters",
     "{{ -3|abs }} {{ 2.5|round }} {{ 3.5|round }} {{ 2.675|round(2) }} {{ 2.1|round(0, 'ceil') }} "
     "{{ 'hello world foo'|truncate(9) }} {{ 'a b c'|wordcount }} {{ '%s=%d'|format('a', 3) }}",
     "{}", "3 2.0 4.0 2.67 3.0 hello... 3 a=3"},
    {"tests",
     "{{ x is defined }}{{ y is undefined }}{{ none is none }}{{ 'a' is string }}{{ 1 is number "
     "}}{{ true is number }}{{ 1 is integer }}{{ 1.0 is float }}{{ true is boolean }}",
     "{\"x\": 1}", "TrueTrueTrueTrueTrueTrueTrueTrueTrue"},
    {"tests",
     "{{ {} is mapping }}{{ [] is iterable }}{{ 1 is iterable }}{{ {} is sequence }}{{ true is "
     "true }}{{ 1 is true }}{{ 0 is false }}",
     "{}", "TrueTrueFalseTrueTrueFalseFalse"},
    {"tests",
     "{{ 3 is odd }}{{ 4 is even }}{{ 9 is divisibleby 3 }}{{ 'a' is eq 'a' }}{{ 'a' is "
     "equalto('a') }}{{ 2 is gt 1 }}{{ 1 is in [1] }}{{ 'x' is not none }}{{ 'ab' is lower }}",
     "{}", "TrueTrueTrueTrueTrueTrueTrueTrueTrue"},
    {"methods",
     "{{ ' a b '.strip() }}|{{ 'xxaxx'.strip('x') }}|{{ ' a '.lstrip() }}|{{ ' a '.rstrip() }}|{{ "
     "'a,b,,c'.split(',') }}{{ ' a  b '.split() }}{{ 'a b c'.split(' ', 1) }}{{ "
     "'a,b,c'.rsplit(',', 1) }}",
     "{}", "a b|a|a | a|['a', 'b', '', 'c']['a', 'b']['a', 'b c']['a,b', 'c']"},
    {"methods",
     "{{ 'abc'.startswith('ab') }}{{ 'abc'.endswith('bc') }}{{ 'abc'.startswith(('x', 'a')) }}{{ "
     "'abc'.upper() }}{{ \"they're bill's\".title() }}{{ 'aBC'.capitalize() }}",
     "{}", "TrueTrueTrueABCThey'Re Bill'SAbc"},
    {"methods",
     "{{ 'a-b'.replace('-', '+') }} {{ 'héllo'.find('l') }} {{ 'hello'.count('l') }} {{ ', "
     "'.join(['a', 'b']) }} {{ '{} is {name}'.format(1, name='x') }}",
     "{}", "a+b 2 2 a, b 1 is x"},
    {"methods",
     "{{ d.get('a') }} {{ d.get('z') }} {{ d.keys()|list }} {{ d.values()|list }} {{ "
     "d.items()|list }} {{ d.items() }}",
     "{\"d\": {\"a\": 1, \"b\": 2}}",
     "1 None ['a', 'b'] [1, 2] [('a', 1), ('b', 2)] dict_items([('a', 1), ('b', 2)])"},
    {"methods",
     "{{ range(3)|list }} {{ range(1, 10, 3)|list }} {{ range(3) }} {{ dict(a=1, b='x') }} {{ "
     "[1,2,1].count(1) }}",
     "{}", "[0, 1, 2] [1, 4, 7] range(0, 3) {'a': 1, 'b': 'x'} 2"},
    {"scoping", "{% for m in l %}[{{ x }}]{% set x = m %}{% endfor %}[{{ x }}]",
     "{\"l\": [1, 2], \"x\": \"ctx\"}", "[ctx][ctx][ctx]"},
    {"scoping", "{% for m in l %}{% endfor %}{% set x = 5 %}{% for m in l %}[{{ x }}]{% endfor %}",
     "{\"l\": [1], \"x\": \"ctx\"}", "[5]"},
    {"scoping", "{% for m in l %}[{{ x }}]{% endfor %}{% set x = 5 %}",
     "{\"l\": [1], \"x\": \"ctx\"}", "[]"},
    {"scoping", "{% if false %}{% set x = 1 %}{% endif %}[{{ x }}]", "{\"x\": \"ctx\"}", "[ctx]"},
    {"scoping", "{% set x %}[{{ x }}]{% endset %}{{ x }}", "{\"x\": \"ctx\"}", "[]"},
    {"scoping",
     "{% macro m() %}[{{ x }}]{% set x = 2 %}{% endmacro %}{{ m() }}{% set x = 1 %}{{ m() }}",
     "{\"x\": \"ctx\"}", "[][1]"},
    {"scoping", "{% filter upper %}{% set y = 'in' %}{{ y }}{% endfilter %}[{{ y }}]",
     "{\"y\": \"ctx\"}", "IN[ctx]"},
    {"scoping",
     "{% macro m(a) %}{{ caller(a) }}{% endmacro %}{% call(v) m(1) %}{{ v }}{{ varargs }}{% "
     "endcall %}",
     "{}", "1()"},
    {"scoping",
     "{% macro m(a, b=a ~ '!') %}{{ a }}{{ b }}{{ kwargs }}{% endmacro %}{{ m(1) }}{{ m(1, k=2) }}",
     "{}", "11!{}11!{'k': 2}"},
};

TEST(ChatTemplateInterpreter, MatchesJinja2OnFocusedCases) {
  for (const Case& c : kCases) {
    SCOPED_TRACE(std::string(c.group) + ": " + c.source);
    EXPECT_EQ(render(c.source, c.vars), c.expected);
  }
}

TEST(ChatTemplateInterpreter, UndefinedBehavesAsJinjasDefaultUndefined) {
  EXPECT_EQ(render("[{{ u }}|{{ u is defined }}|{{ u|length }}|{% for x in u %}x{% endfor %}|"
                   "{{ u|default('z') }}|{{ u == u }}|{{ u|string }}|{{ u|trim }}|"
                   "{{ m.missing }}|{{ m.missing is none }}|{{ none.attr }}]",
                   R"({"m": {}})"),
            "[|False|0||z|True||||False|]");
}

TEST(ChatTemplateInterpreter, PrintingAnAddressIsRefusedRatherThanWrong) {
  // Jinja prints "<built-in method items of dict object at 0x...>" and "<generator object ...>".
  EXPECT_TRUE(contains(render_error("{{ d.items }}", R"({"d": {}})"), "cannot print a function"));
  EXPECT_TRUE(contains(render_error("{{ [1]|map('string') }}"), "cannot print an iterator"));
}

}  // namespace
}  // namespace moemesh
