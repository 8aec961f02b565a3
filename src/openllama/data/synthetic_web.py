"""A synthetic Common Crawl WARC, written with warcio, for the tests, the benchmark and trying the
web path without a download: English and Chinese article pages inside navigation/footer/cookie
boilerplate, near-duplicates of some of them (a few words changed, other boilerplate and URL),
spam (repeated phrases, keyword lists), and records that are not pages (PDF and image responses,
requests, metadata, warcinfo). `make_warc` returns the ground truth: the URL of every page by kind.
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass, field
from pathlib import Path

_EN_STOP = "the of and to in a is that for it as with was on be by at this have from or an are".split()
_EN_WORDS = ("river market people history garden winter science music teacher village system language "
             "morning family window country problem student machine company evening mountain doctor story "
             "travel kitchen library energy museum harbor forest council bridge weather painter journey "
             "program harvest engine century measure product season culture friend letter island silver "
             "station factory theory pattern balance shadow signal coffee ticket battery network camera "
             "planet ocean valley desert orchard lantern meadow canyon glacier thunder compass ladder "
             "farmer sailor writer builder dancer singer baker miner pilot judge nurse clerk tailor "
             "walks carries builds writes opens closes finds keeps brings changes shows remembers watches "
             "quiet bright heavy gentle ancient modern simple careful sudden narrow golden distant").split()
_ZH_WORDS = ("我们 他们 今天 明天 学校 老师 学生 城市 国家 经济 发展 社会 文化 历史 科学 技术 工作 生活 问题 方法 "
             "时间 地方 朋友 家庭 孩子 父母 公司 市场 政府 人民 世界 中国 北京 上海 河流 山区 农村 天气 春天 夏天 "
             "秋天 冬天 音乐 电影 书籍 图书馆 博物馆 医院 医生 病人 火车 飞机 道路 桥梁 工厂 工人 农民 粮食 水果 "
             "研究 调查 报告 会议 计划 项目 系统 网络 电脑 手机 数据 信息 教育 环境 保护 能源 交通 旅游 体育 比赛 "
             "重要 主要 新的 传统 现代 简单 复杂 美丽 安静 热闹 认为 希望 开始 继续 完成 参加 提高 改善 讨论 介绍 "
             "影响 变化 增加 减少 建设 管理 组织 服务 支持 帮助 学习 了解 发现 解决 使用 提供 需要 进行 推动").split()
_ZH_GLUE = "的 了 是 在 和 也 都 很 就 还 把 被 对 从 这 那 有 不".split()
_SPAM = ["buy cheap watches now", "best price guaranteed", "click here to win", "free casino bonus today"]


@dataclass
class WebCorpus:
    """Ground truth of a synthetic WARC: URLs by kind."""

    english: list[str] = field(default_factory=list)  # distinct English articles
    chinese: list[str] = field(default_factory=list)  # distinct Chinese articles
    near_duplicates: dict[str, str] = field(default_factory=dict)  # copy URL -> original URL
    spam: list[str] = field(default_factory=list)
    not_html: int = 0  # non-HTML responses


def english_article(rng: random.Random, paragraphs: int = 5) -> list[str]:
    out = []
    for _ in range(paragraphs):
        sentences = []
        for _ in range(rng.randint(4, 7)):
            words = [rng.choice(_EN_STOP) if rng.random() < 0.4 else rng.choice(_EN_WORDS)
                     for _ in range(rng.randint(9, 16))]
            sentences.append(" ".join(words).capitalize() + ".")
        out.append(" ".join(sentences))
    return out


def chinese_article(rng: random.Random, paragraphs: int = 5) -> list[str]:
    out = []
    for _ in range(paragraphs):
        sentences = []
        for _ in range(rng.randint(4, 7)):
            parts = [rng.choice(_ZH_GLUE) if rng.random() < 0.35 else rng.choice(_ZH_WORDS)
                     for _ in range(rng.randint(8, 14))]
            sentences.append("".join(parts) + rng.choice("。。。！？"))
        out.append("".join(sentences))
    return out


def edit(paragraphs: list[str], rng: random.Random, edits: int = 3) -> list[str]:
    """A near-duplicate: `edits` single-word (or single-character) changes."""
    out = list(paragraphs)
    for _ in range(edits):
        i = rng.randrange(len(out))
        if " " in out[i]:
            words = out[i].split(" ")
            words[rng.randrange(len(words))] = rng.choice(_EN_WORDS)
            out[i] = " ".join(words)
        else:
            j = rng.randrange(len(out[i]) - 1)
            out[i] = out[i][:j] + rng.choice(_ZH_WORDS) + out[i][j + 1 :]
    return out


def html_page(title: str, paragraphs: list[str], rng: random.Random, lang: str = "en") -> str:
    site = rng.choice(["Daily Notes", "City Herald", "Open Journal", "The Review"])
    nav = "".join(f'<li><a href="/{x.lower()}">{x}</a></li>' for x in ["Home", "News", "Sports", "About", "Contact"])
    body = "".join(f"<p>{p}</p>" for p in paragraphs)
    return (f'<!DOCTYPE html><html lang="{lang}"><head><meta charset="utf-8"><title>{title}</title></head><body>'
            f'<header><div class="logo">{site}</div><nav><ul>{nav}</ul></nav></header>'
            f'<div class="cookie">This site uses cookies. Accept all cookies?</div>'
            f"<main><article><h1>{title}</h1>{body}</article></main>"
            f'<aside><h3>Related</h3><ul><li><a href="/a">More stories</a></li><li><a href="/b">Popular</a></li></ul></aside>'
            f"<footer><p>Copyright 2024 {site}. All rights reserved.</p><p><a href='/privacy'>Privacy Policy</a> | "
            f"<a href='/terms'>Terms of Use</a></p></footer></body></html>")


def spam_page(rng: random.Random) -> str:
    phrase = rng.choice(_SPAM)
    if rng.random() < 0.5:
        body = "<p>" + " ".join([phrase] * rng.randint(60, 120)) + "</p>"
    else:
        body = "".join(f"<p>{phrase} {rng.choice(_EN_WORDS)}</p>" for _ in range(80))
    return f"<html><head><title>{phrase}</title></head><body><main>{body}</main></body></html>"


def _write(writer, url: str, payload: bytes, content_type: str, rec_type: str = "response") -> None:
    from warcio.statusandheaders import StatusAndHeaders

    if rec_type == "response":
        http = StatusAndHeaders("200 OK", [("Content-Type", content_type)], protocol="HTTP/1.1")
        writer.write_record(writer.create_warc_record(url, "response", payload=io.BytesIO(payload), http_headers=http))
    else:
        writer.write_record(writer.create_warc_record(url, rec_type, payload=io.BytesIO(payload),
                                                      warc_content_type=content_type))


def make_warc(path: str | Path, english: int = 40, chinese: int = 20, near_duplicates: int = 20, spam: int = 10,
              seed: int = 0, gzip: bool = True) -> WebCorpus:
    """Write a WARC file of the given mix (pages in a shuffled order); its ground truth."""
    from warcio.warcwriter import WARCWriter

    rng = random.Random(seed)
    truth, pages = WebCorpus(), []
    for i in range(english):
        url = f"https://en.example.org/{seed}/article-{i}"
        truth.english.append(url)
        pages.append((url, "en", f"Article {i} of the archive", english_article(rng)))
    for i in range(chinese):
        url = f"https://zh.example.cn/{seed}/wenzhang-{i}"
        truth.chinese.append(url)
        pages.append((url, "zh", f"第{i}篇文章", chinese_article(rng)))
    originals = list(pages)
    order = list(range(len(pages)))
    rng.shuffle(order)
    pages = [pages[i] for i in order]
    picks = rng.sample(range(len(originals)), min(near_duplicates, len(originals)))
    picks += [rng.randrange(len(originals)) for _ in range(near_duplicates - len(picks))]
    for i, pick in enumerate(picks):  # copies come after their original (the original is kept)
        url, lang, title, paras = originals[pick]
        copy_url = f"https://mirror{i}.example.net/{seed}/copy-{i}"
        truth.near_duplicates[copy_url] = url
        pages.append((copy_url, lang, title, edit(paras, rng, edits=rng.randint(1, 3))))
    with open(path, "wb") as f:
        writer = WARCWriter(f, gzip=gzip)
        writer.write_record(writer.create_warcinfo_record(Path(path).name, {"software": "openllama synthetic"}))
        for n, (url, lang, title, paras) in enumerate(pages):
            _write(writer, url, b"GET / HTTP/1.1\r\n\r\n", "application/http; msgtype=request", "request")
            _write(writer, url, html_page(title, paras, rng, lang).encode("utf-8"), "text/html; charset=utf-8")
            if n < spam:
                spam_url = f"https://spam{n}.example.com/{seed}/offer"
                truth.spam.append(spam_url)
                _write(writer, spam_url, spam_page(rng).encode("utf-8"), "text/html")
            if n % 10 == 0:
                truth.not_html += 2
                _write(writer, f"{url}.pdf", b"%PDF-1.4 binary", "application/pdf")
                _write(writer, f"{url}.jpg", b"\xff\xd8\xff\xe0 jpeg", "image/jpeg")
                _write(writer, url, b"fetchTimeMs: 12\n", "application/warc-fields", "metadata")
    return truth


def make_wet(path: str | Path, texts: dict[str, str]) -> None:
    """A WET file: one `conversion` record (plain text) per URL."""
    from warcio.warcwriter import WARCWriter

    with open(path, "wb") as f:
        writer = WARCWriter(f, gzip=True)
        for url, text in texts.items():
            _write(writer, url, text.encode("utf-8"), "text/plain", "conversion")
