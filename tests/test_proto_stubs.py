from xaiserve.service.protogen import stale_files


def test_committed_stubs_match_the_proto():
    stale = stale_files()
    assert stale == [], f"stale generated stubs {stale}: run `python -m xaiserve.service.protogen` and commit"
