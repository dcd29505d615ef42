"""Tests for the huge-page re-exec of the command lines (capi_jax.base.huge_pages)."""

import pytest

from capi_jax.base import huge_pages


@pytest.fixture
def madvise_glibc(monkeypatch):
  """A host where the re-exec applies: THP on request, glibc 2.36."""
  monkeypatch.setattr(huge_pages, '_thp_mode', lambda: 'madvise')
  monkeypatch.setattr(huge_pages, '_glibc_version', lambda: (2, 36))


def test_turns_huge_pages_on_keeping_the_users_tunables(madvise_glibc):
  del madvise_glibc
  assert huge_pages.tunables_with_huge_pages({}) == 'glibc.malloc.hugetlb=1'
  assert (huge_pages.tunables_with_huge_pages({'GLIBC_TUNABLES': 'glibc.malloc.arena_max=2'})
          == 'glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1')


@pytest.mark.parametrize('tunables', ['glibc.malloc.hugetlb=0', 'glibc.malloc.hugetlb=1',
                                      'glibc.malloc.arena_max=2:glibc.malloc.hugetlb=0'])
def test_the_users_choice_stands(madvise_glibc, tunables):
  del madvise_glibc
  assert huge_pages.tunables_with_huge_pages({'GLIBC_TUNABLES': tunables}) is None


@pytest.mark.parametrize('mode, glibc', [('always', (2, 36)), ('never', (2, 36)), ('', (2, 36)),
                                         ('madvise', (2, 31)), ('madvise', ())])
def test_nothing_to_do_where_it_would_not_help(monkeypatch, mode, glibc):
  monkeypatch.setattr(huge_pages, '_thp_mode', lambda: mode)
  monkeypatch.setattr(huge_pages, '_glibc_version', lambda: glibc)
  assert huge_pages.tunables_with_huge_pages({}) is None


def test_reexec_keeps_the_command_line(monkeypatch, madvise_glibc):
  del madvise_glibc
  calls = []
  monkeypatch.setattr(huge_pages.os, 'execve', lambda *args: calls.append(args))
  monkeypatch.setattr(huge_pages.sys, 'orig_argv', ['python', '-m', 'capi_jax.main', '--x=1'])
  monkeypatch.delenv('GLIBC_TUNABLES', raising=False)
  huge_pages.reexec_with_huge_pages()
  (executable, argv, env), = calls
  assert argv == [executable, '-m', 'capi_jax.main', '--x=1']
  assert env['GLIBC_TUNABLES'] == 'glibc.malloc.hugetlb=1'
