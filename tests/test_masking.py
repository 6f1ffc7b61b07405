import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keruta.masking import Masker, StreamMasker, secrets_from_env


def reference_mask(data: bytes, secrets: list[bytes]) -> bytes:
    """Every maximal run of bytes covered by some occurrence of a secret becomes ***."""
    covered = [False] * len(data)
    for s in secrets:
        if not s:
            continue
        i = data.find(s)
        while i != -1:
            for j in range(i, i + len(s)):
                covered[j] = True
            i = data.find(s, i + 1)
    out = bytearray()
    for j, byte in enumerate(data):
        if not covered[j]:
            out.append(byte)
        elif j == 0 or not covered[j - 1]:
            out += b"***"
    return bytes(out)


def test_env_collection_rules() -> None:
    env = {
        "API_TOKEN": "tok-1234",
        "db_password": "hunter22",
        "MySecretThing": "s3cr3t!",
        "SSH_KEY": "abc",  # too short
        "MONKEY": "banana",  # the contract's rule is "name contains KEY"
        "HOME": "/home/user",  # name doesn't qualify
        "PATH": "/usr/bin",
        "EMPTY_TOKEN": "",
    }
    masker = Masker.from_env(env, extra=["cli-secret", "", "xy"])
    assert set(masker.secrets) == {"tok-1234", "hunter22", "s3cr3t!", "banana", "cli-secret", "xy"}
    assert masker.mask("tok-1234 hunter22 /home/user abc xy") == "*** *** /home/user abc ***"


def test_env_values_with_newlines_mask_each_line() -> None:
    pem = "-----BEGIN KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC\nab\n-----END KEY-----\n"
    found = secrets_from_env({"PRIVATE_KEY": pem})
    assert "MIIEvQIBADANBgkqhkiG9w0BAQEFAASC" in found
    assert "ab" not in found
    assert pem in found and pem.strip() in found


def test_empty_masker_is_false_and_changes_nothing() -> None:
    masker = Masker.from_env({"HOME": "/root"}, extra=[""])
    assert not masker
    assert masker.mask("anything") == "anything"
    assert masker.mask_bytes(b"anything") == b"anything"
    stream = masker.stream()
    assert stream.feed(b"abc") == b"abc" and stream.flush() == b""
    assert Masker(["x"])


def test_repr_hides_secrets() -> None:
    assert "hunter2" not in repr(Masker(["hunter2"]))


def test_longest_first_masks_fully() -> None:
    masker = Masker(["pass", "password123"])
    assert masker.mask("my password123!") == "my ***!"
    assert masker.mask("pass password12") == "*** ***word12"


def test_overlapping_secrets_mask_their_union() -> None:
    masker = Masker(["abcd", "cdef"])
    assert masker.mask("xabcdefx") == "x***x"
    assert masker.mask("abcdabcd") == "***"  # touching runs become one mask
    assert masker.mask("ab cd ef") == "ab cd ef"


def test_regex_characters_are_literal() -> None:
    masker = Masker(["a.b*c", "(x|y)"])
    assert masker.mask("a.b*c aXbc (x|y) x") == "*** aXbc *** x"


def test_bytes_use_utf8() -> None:
    masker = Masker(["pässwörd"])
    assert masker.mask_bytes("is pässwörd\n".encode()) == b"is ***\n"
    assert masker.mask("is pässwörd") == "is ***"


def feed_all(stream: StreamMasker, chunks: list[bytes]) -> bytes:
    return b"".join(stream.feed(c) for c in chunks) + stream.flush()


def test_stream_holds_back_only_what_might_be_a_secret() -> None:
    stream = StreamMasker(Masker(["secret"]))
    assert stream.feed(b"hello sec") == b"hello "
    assert stream.held == 3
    assert stream.feed(b"ret and more") == b"*** and more"
    assert stream.held == 0
    assert stream.flush() == b""
    # flushing an incomplete prefix emits it as is
    assert stream.feed(b"sec") == b""
    assert stream.flush() == b"sec"


def test_nothing_is_held_without_a_possible_secret() -> None:
    """A short last line goes out at once, not when the command next writes."""
    stream = Masker(["hunter22-long-secret"]).stream()
    assert stream.feed(b"done\n") == b"done\n"
    assert stream.held == 0


def test_only_a_possible_secret_prefix_is_held() -> None:
    stream = Masker(["hunter22"]).stream()
    assert stream.feed(b"password: hun") == b"password: "
    assert stream.held == 3
    assert stream.feed(b"ter22!\n") == b"***!\n"
    assert stream.feed(b"hunt") == b""
    assert stream.feed(b"ing\n") == b"hunting\n"


def test_secret_straddling_reads_byte_by_byte() -> None:
    masker = Masker(["s3cr3t-value"])
    data = b"a s3cr3t-value b s3cr3t-valu c\n"
    out = feed_all(masker.stream(), [bytes([b]) for b in data])
    assert out == b"a *** b s3cr3t-valu c\n"


def test_touching_secrets_across_reads_become_one_mask() -> None:
    masker = Masker(["abc", "def"])
    stream = masker.stream()
    assert stream.feed(b"xabc") == b"x***"  # complete, and nothing can extend "abc"
    assert stream.feed(b"def!") == b"!"  # touches the previous *** and joins it
    assert stream.flush() == b""
    assert masker.mask_bytes(b"xabcdef!") == b"x***!"


def test_overlap_chain_holds_a_bounded_tail() -> None:
    """An endless chain of overlapping secrets goes out as it is known."""
    masker = Masker(["abab"])
    stream = masker.stream()
    out = b"".join(stream.feed(b"ab") for _ in range(1000))
    assert stream.held <= 3
    assert out + stream.feed(b"!") + stream.flush() == b"***!"


def test_stream_long_chunk_without_newline() -> None:
    masker = Masker(["TOKEN-VALUE"])
    data = (b"x" * 100_000 + b"TOKEN-VALUE") * 20
    stream = masker.stream()
    out = b"".join(stream.feed(data[i : i + 65536]) for i in range(0, len(data), 65536))
    out += stream.flush()
    assert out == (b"x" * 100_000 + b"***") * 20


secret_text = st.binary(min_size=1, max_size=6).map(lambda b: bytes(x % 3 + 97 for x in b))
data_text = st.binary(max_size=60).map(lambda b: bytes(x % 4 + 97 for x in b))


@settings(max_examples=300)
@given(secrets=st.lists(secret_text, min_size=1, max_size=4), data=data_text)
def test_mask_bytes_matches_the_reference(secrets: list[bytes], data: bytes) -> None:
    masker = Masker([s.decode() for s in secrets])
    assert masker.mask_bytes(data) == reference_mask(data, secrets)
    assert masker.mask(data.decode()) == reference_mask(data, secrets).decode()


@settings(max_examples=300)
@given(
    secrets=st.lists(secret_text, min_size=1, max_size=4),
    data=data_text,
    cuts=st.lists(st.integers(0, 60), max_size=12),
)
def test_stream_equals_whole_for_any_chunking(
    secrets: list[bytes], data: bytes, cuts: list[int]
) -> None:
    masker = Masker([s.decode() for s in secrets])
    stream = masker.stream()
    bounds = sorted({0, len(data), *(c for c in cuts if c <= len(data))})
    out = b""
    for a, b in zip(bounds, bounds[1:], strict=False):
        out += stream.feed(data[a:b])
        assert stream.held <= masker.longest_bytes - 1
        if stream.held:
            # Held only while the held bytes could still become (part of) a secret.
            assert any(
                s.startswith(data[p:b]) and len(s) > b - p
                for s in secrets
                for p in range(b - stream.held + 1)
            )
    out += stream.flush()
    assert out == reference_mask(data, secrets)
    for s in secrets:
        assert s not in out


unicode_secrets = st.lists(
    st.text(alphabet="abcx€", min_size=1, max_size=6), min_size=1, max_size=3
)


@settings(max_examples=300, deadline=None)
@given(
    secrets=unicode_secrets,
    parts=st.lists(st.sampled_from(["a", "b", "c", "x", "€", "\n", " ", "abc", "xx"]), max_size=60),
    cuts=st.lists(st.integers(1, 7), max_size=30),
)
def test_stream_of_utf8_text_equals_masking_the_whole(
    secrets: list[str], parts: list[str], cuts: list[int]
) -> None:
    masker = Masker(secrets)
    data = "".join(parts).encode()
    chunks = []
    pos = 0
    for c in cuts:
        chunks.append(data[pos : pos + c])
        pos += c
    chunks.append(data[pos:])
    assert feed_all(masker.stream(), chunks) == masker.mask_bytes(data)


@given(
    prefix=st.binary(max_size=20).map(lambda b: b.replace(b"S", b"s")),
    suffix=st.binary(max_size=20).map(lambda b: b.replace(b"S", b"s")),
    data=st.data(),
)
def test_a_secret_split_at_every_boundary_never_leaks(
    prefix: bytes, suffix: bytes, data: st.DataObject
) -> None:
    secret = "Sup3r-S3cret"
    masker = Masker([secret])
    whole = prefix + secret.encode() + suffix
    # Split at every boundary inside the secret, one split per run, and at random extra cuts.
    for split in range(len(prefix), len(prefix) + len(secret) + 1):
        extra = data.draw(st.lists(st.integers(0, len(whole)), max_size=3))
        bounds = sorted({0, split, len(whole), *extra})
        stream = masker.stream()
        out = b"".join(stream.feed(whole[a:b]) for a, b in zip(bounds, bounds[1:], strict=False))
        out += stream.flush()
        assert secret.encode() not in out
        assert out == masker.mask_bytes(whole)
        if b"Sup3r" not in prefix + suffix and b"S3cret" not in prefix + suffix:
            assert out == prefix + b"***" + suffix


def test_stream_byte_by_byte_with_overlaps() -> None:
    masker = Masker(["abab", "bab"])
    data = b"xabababababy ab bab"
    stream = masker.stream()
    out = b"".join(stream.feed(data[i : i + 1]) for i in range(len(data))) + stream.flush()
    assert out == b"x***y ab ***"


@pytest.mark.parametrize("chunk", [1, 2, 3, 7])
def test_stream_can_be_reused_after_flush(chunk: int) -> None:
    stream = Masker(["key1"]).stream()
    for _ in range(2):
        data = b"akey1bkey"
        out = b"".join(stream.feed(data[i : i + chunk]) for i in range(0, len(data), chunk))
        assert out + stream.flush() == b"a***bkey"
