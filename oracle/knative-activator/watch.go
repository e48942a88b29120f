package main

import (
	"context"
	"fmt"

	"github.com/fsnotify/fsnotify"
	"go.uber.org/zap"
)

// watchDir calls reload after the files of dir change. Events that arrive while a reload runs
// are coalesced into one more reload (unchanged objects are not re-sent to the informers).
// Dot files (editors' and atomic writers' temporaries) are ignored. It returns at once; the
// watch ends with ctx.
func watchDir(ctx context.Context, dir string, logger *zap.SugaredLogger, reload func()) error {
	w, err := fsnotify.NewWatcher()
	if err != nil {
		return fmt.Errorf("watching %s: %w", dir, err)
	}
	if err := w.Add(dir); err != nil {
		_ = w.Close()
		return fmt.Errorf("watching %s: %w", dir, err)
	}
	pending := make(chan struct{}, 1)
	go func() {
		for {
			select {
			case <-ctx.Done():
				return
			case <-pending:
				reload()
			}
		}
	}()
	go func() {
		defer w.Close()
		for {
			select {
			case <-ctx.Done():
				return
			case ev, ok := <-w.Events:
				if !ok {
					return
				}
				if ev.Op == fsnotify.Chmod || isHidden(ev.Name) {
					continue
				}
				select {
				case pending <- struct{}{}:
				default:
				}
			case err, ok := <-w.Errors:
				if !ok {
					return
				}
				logger.Warnw("manifest watch error", zap.Error(err))
			}
		}
	}()
	return nil
}

func isHidden(path string) bool {
	for i := len(path) - 1; i >= 0; i-- {
		if path[i] == '/' {
			return i+1 < len(path) && path[i+1] == '.'
		}
	}
	return len(path) > 0 && path[0] == '.'
}
